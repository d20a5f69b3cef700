"""`mergebot demo`: a merge of small demo models, end to end, with no account or network.

It builds a base model and three fine-tunes, audits them, and merges them with TIES,
showing the same steps the bot and the Space run.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="mergebot demo", description=__doc__)
    parser.add_argument("--data", default="demo-data", help="folder for the demo models and results")
    parser.add_argument("--host", default="127.0.0.1", help="(reserved for the Space)")
    parser.add_argument("--port", type=int, default=7860, help="(reserved for the Space)")
    args = parser.parse_args(list(argv))

    from engine.cli import main as engine_main
    from mergebot.demo_models import build_demo_models

    models = build_demo_models(os.path.join(args.data, "models"))
    recipe = os.path.join(args.data, "ties-demo.yml")
    with open(recipe, "w", encoding="utf-8") as f:
        f.write(
            "merge_method: ties\n"
            f"base_model: {models['base']}\n"
            "models:\n"
            f"  - model: {models['math-tune']}\n    parameters: {{weight: 0.5, density: 0.6}}\n"
            f"  - model: {models['code-tune']}\n    parameters: {{weight: 0.3, density: 0.6}}\n"
            f"  - model: {models['chat-tune']}\n    parameters: {{weight: [0.1, 0.4], density: 0.5}}\n"
            "dtype: bfloat16\n"
        )
    print(f"demo models in {os.path.dirname(models['base'])}; recipe {recipe}\n")
    print("$ mergebot check", recipe)
    if engine_main(["check", recipe]):
        return 1
    out = os.path.join(args.data, "merged-ties")
    print("\n$ mergebot merge", recipe, out, "--overwrite")
    return engine_main(["merge", recipe, out, "--overwrite"])
