"""The Gradio Space: a view over the bot's services (compose, check, submit, evolve, queue); no merge logic.

``space.app.create_app(bot)`` serves the page beside the bot's webhook; ``space.compose`` maps
the form to mergekit YAML; ``space.service`` adapts the bot; ``space.views`` shapes what is shown;
``space.evolve_tab`` is the Evolve tab; ``space.session`` says who is signed in and words errors.
"""
