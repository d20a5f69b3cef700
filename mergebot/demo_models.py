"""Small demo models built on the spot: a Llama-shaped base, fine-tunes of it, and their cards.

Random weights (no download is possible offline), but real checkpoints: transformers
loads them, and the fine-tunes differ from their parent by small task vectors, as real
fine-tunes do, so every merge method has something meaningful to combine. The family has
two generations of lineage (base -> fine-tunes -> a fine-tune of a fine-tune), parents under
different licences, and one model of another shape, to show what an incompatible merge says.

Each model carries a small real tokenizer (a BPE of at most ``vocab`` tokens, trained here on a
short built-in text, loadable with transformers' ``AutoTokenizer``), and the demo's evaluation
dataset (``demo-lab/eval-text``: a text for perplexity and prompt/answer items) is written from the
same text, so an evolutionary search over the demo models runs out of the box.
"""

from __future__ import annotations

import json
import os
import random
import string
from dataclasses import dataclass

import torch

ORG = "demo-lab"


@dataclass(frozen=True)
class DemoModel:
    """One demo repo: its name, licence, parent (``base_model``) and what it is."""

    name: str
    license: str
    parent: str | None
    about: str
    hidden: int = 64

    @property
    def repo_id(self) -> str:
        return f"{ORG}/{self.name}"


DEMO_FAMILY: tuple[DemoModel, ...] = (
    DemoModel("tiny-base", "apache-2.0", None, "the base model every other demo model was fine-tuned from"),
    DemoModel("tiny-math", "mit", "tiny-base", "a fine-tune of tiny-base for arithmetic"),
    DemoModel("tiny-code", "apache-2.0", "tiny-base", "a fine-tune of tiny-base for code"),
    DemoModel("tiny-chat", "cc-by-nc-4.0", "tiny-base", "a non-commercial chat fine-tune of tiny-base"),
    DemoModel("tiny-llama-style", "llama3", "tiny-base", "a fine-tune under a Llama-3-style licence"),
    DemoModel(
        "tiny-math-pro", "mit", "tiny-math", "a fine-tune of tiny-math (two generations from the base)"
    ),
    DemoModel("wide-base", "apache-2.0", None, "an unrelated model with a larger hidden size", hidden=96),
)
DEMO_MODELS = tuple(m.name for m in DEMO_FAMILY)
DEMO_DATASET = f"{ORG}/eval-text"  # a dataset repo: eval.txt (perplexity) and qa.jsonl (items)

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>")  # ids 0-3: bos 1 and eos 2, as in the config
# The tokenizer's training text, and the source of the evaluation text.
DEMO_TEXT = """Model merging combines the weights of several fine-tuned models into one new model, without any training.
A fine-tune starts from a base model and moves its weights a little way towards a task: arithmetic, code or chat.
The difference between a fine-tune and its base model is called a task vector.
Linear merging takes a weighted average of the task vectors and adds it to the base model.
TIES keeps the largest entries of each task vector, elects a sign for every weight and averages those that agree.
DARE drops most entries of each task vector at random and rescales the rest, so that the merge keeps its size.
SLERP blends two models along the arc between them instead of the straight line.
An evolutionary search tries many weights and densities, scores every merge on a small evaluation text, and keeps the best one.
The score of a language model on a text is its perplexity: the lower it is, the better the model predicts the next token.
A model card names the parents of a merge, their licences, and the recipe that made it, so that anyone can make it again.
"""


def _config(hidden: int, layers: int, vocab: int) -> dict[str, object]:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": hidden * 2,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": hidden // 4,
        "vocab_size": vocab,
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "hidden_act": "silu",
        "bos_token_id": 1,
        "eos_token_id": 2,
        "dtype": "bfloat16",
    }


def _shapes(hidden: int, layers: int, vocab: int) -> dict[str, tuple[int, ...]]:
    kv = 2 * hidden // 4
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (hidden,),
            p + "self_attn.q_proj.weight": (hidden, hidden),
            p + "self_attn.k_proj.weight": (kv, hidden),
            p + "self_attn.v_proj.weight": (kv, hidden),
            p + "self_attn.o_proj.weight": (hidden, hidden),
            p + "post_attention_layernorm.weight": (hidden,),
            p + "mlp.gate_proj.weight": (hidden * 2, hidden),
            p + "mlp.up_proj.weight": (hidden * 2, hidden),
            p + "mlp.down_proj.weight": (hidden, hidden * 2),
        }
    return shapes | {"model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)}


def model_card(model: DemoModel) -> str:
    """The README.md of a demo repo: licence and ``base_model`` in the front matter."""
    meta = [f"license: {model.license}", "library_name: transformers", "tags: [mergebot-demo]"]
    if model.parent:
        meta.append(f"base_model: {ORG}/{model.parent}")
    return "---\n" + "\n".join(meta) + f"\n---\n\n# {model.name}\n\nA tiny demo model: {model.about}.\n"


def tokenizer_files(vocab: int = 256) -> dict[str, str]:
    """tokenizer.json and tokenizer_config.json of the demo tokenizer (at most ``vocab`` tokens).

    A BPE over printable ASCII with SentencePiece-style word boundaries (``▁``), trained on
    :data:`DEMO_TEXT` in milliseconds and deterministic; other characters become ``<unk>``.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    alphabet = list(string.ascii_letters + string.digits + string.punctuation)
    core = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS[0]))
    core.normalizer = normalizers.NFKC()
    core.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    core.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first")
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=alphabet,
        limit_alphabet=len(alphabet) + 1,  # + the word boundary
        min_frequency=1,
        show_progress=False,
    )
    core.train_from_iterator(DEMO_TEXT.splitlines(), trainer=trainer)
    if core.get_vocab_size() > vocab:
        raise RuntimeError(f"the demo tokenizer has {core.get_vocab_size()} tokens, more than {vocab}")
    core.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    bos, eos, unk, pad = SPECIAL_TOKENS[1], SPECIAL_TOKENS[2], SPECIAL_TOKENS[0], SPECIAL_TOKENS[3]
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos,
        "eos_token": eos,
        "unk_token": unk,
        "pad_token": pad,
        "clean_up_tokenization_spaces": False,
    }
    return {"tokenizer.json": core.to_str(), "tokenizer_config.json": json.dumps(config, indent=2)}


def eval_text(n_sentences: int = 120, seed: int = 0) -> str:
    """The demo's perplexity text: :data:`DEMO_TEXT`'s sentences in a seeded random order."""
    sentences = DEMO_TEXT.splitlines()
    rng = random.Random(seed)
    return "\n".join(rng.choice(sentences) for _ in range(n_sentences)) + "\n"


def qa_items(n: int = 32, seed: int = 0) -> list[dict[str, object]]:
    """Sums as prompt/answer items with four choices (for ``exact_match`` and ``loglikelihood``)."""
    rng = random.Random(seed)
    items: list[dict[str, object]] = []
    seen: set[tuple[int, int]] = set()
    while len(items) < n:
        a, b = rng.randint(1, 20), rng.randint(1, 20)
        if (a, b) in seen:
            continue
        seen.add((a, b))
        wrong = rng.sample([c for c in range(2, 41) if c != a + b], 3)
        items.append(
            {
                "prompt": f"{a} + {b} =",
                "answer": f" {a + b}",
                "choices": [f" {c}" for c in sorted([a + b, *wrong])],
            }
        )
    return items


DATASET_CARD = f"""---
license: cc0-1.0
tags: [mergebot-demo]
---

# eval-text

Evaluation data for the demo's evolutionary searches (`hf://datasets/{DEMO_DATASET}/eval.txt`):

- `eval.txt`: English sentences about model merging, for `kind: perplexity`;
- `qa.jsonl`: sums as `{{"prompt", "answer", "choices"}}` items, for `kind: exact_match` or `loglikelihood`.
"""


def build_demo_dataset(folder: str) -> str:
    """Write the demo evaluation dataset (README.md, eval.txt, qa.jsonl) into ``folder``; returns it."""
    os.makedirs(folder, exist_ok=True)
    files = {
        "README.md": DATASET_CARD,
        "eval.txt": eval_text(),
        "qa.jsonl": "".join(json.dumps(item) + "\n" for item in qa_items()),
    }
    for name, text in files.items():
        with open(os.path.join(folder, name), "w", encoding="utf-8") as f:
            f.write(text)
    return folder


def build_demo_models(folder: str, *, layers: int = 4, vocab: int = 256, seed: int = 0) -> dict[str, str]:
    """Write the demo family under ``folder`` (once; reused if present) and return name -> path.

    Each folder holds model.safetensors, config.json, generation_config.json, the tokenizer
    (tokenizer.json, tokenizer_config.json) and README.md.
    """
    from safetensors.torch import save_file

    paths = {m.name: os.path.join(folder, m.name) for m in DEMO_FAMILY}
    if all(
        os.path.exists(os.path.join(p, "README.md")) and os.path.exists(os.path.join(p, "tokenizer.json"))
        for p in paths.values()
    ):
        return paths
    tokenizer = tokenizer_files(vocab)
    generator = torch.Generator().manual_seed(seed)
    weights: dict[str, dict[str, torch.Tensor]] = {}
    for model in DEMO_FAMILY:
        if model.parent is None:
            tensors = {
                name: (
                    torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=generator) * 0.02
                )
                for name, shape in _shapes(model.hidden, layers, vocab).items()
            }
        else:  # parent + a small task vector
            tensors = {
                k: v + 0.004 * torch.randn(v.shape, generator=generator)
                for k, v in weights[model.parent].items()
            }
        weights[model.name] = tensors
        path = paths[model.name]
        os.makedirs(path, exist_ok=True)
        save_file(
            {k: v.to(torch.bfloat16).contiguous() for k, v in tensors.items()},
            os.path.join(path, "model.safetensors"),
            metadata={"format": "pt"},
        )
        with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
            json.dump(_config(model.hidden, layers, vocab), f, indent=2)
        with open(os.path.join(path, "generation_config.json"), "w", encoding="utf-8") as f:
            json.dump({"bos_token_id": 1, "eos_token_id": 2}, f)
        for file, text in tokenizer.items():
            with open(os.path.join(path, file), "w", encoding="utf-8") as f:
                f.write(text)
        with open(os.path.join(path, "README.md"), "w", encoding="utf-8") as f:
            f.write(model_card(model))
    return paths
