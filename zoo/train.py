"""Truncated-BPTT trainer for char models: parallel streams with carried state, Adam or RMSprop,
gradient-norm clipping (every step's pre-clip norm goes in the card), warmup + cosine learning
rate, validation every N steps, atomic checkpoints, and exact resume after a kill."""
from __future__ import annotations

import json
import math
import shutil
import signal
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from . import checkpoint
from .config import TrainConfig, config_from  # noqa: F401  (config_from: the command line's)
from .corpora import Corpus, corpus as get_corpus
from rnnscope.errors import RnnscopeError
from rnnscope.store import atomic_write
from .model import Architecture, CharModel, bits
from .vocab import Vocab

STATE_DIR = "train_state"
WATCH_DIR = "watch"
# how often the watch log may change without refusing to resume: it does not change the training
_FREE = ("watch_every",)


def learning_rate(c: TrainConfig, step: int) -> float:
    """Linear warmup, then cosine decay from ``lr`` to ``min_lr`` at the last step."""
    if step < c.warmup:
        return c.lr * (step + 1) / c.warmup
    progress = (step - c.warmup) / max(1, c.steps - c.warmup)
    return c.min_lr + 0.5 * (c.lr - c.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def streams(ids: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut ``ids[time]`` into ``batch`` contiguous streams: inputs and next-char targets ``[batch, length]``."""
    length = (len(ids) - 1) // batch
    if length < 2:
        raise RnnscopeError(f"text of {len(ids)} characters is too short for {batch} streams", "use a smaller batch")
    x = ids[: batch * length].view(batch, length)
    y = ids[1: batch * length + 1].view(batch, length)
    return x, y


def detach(state):
    return tuple(s.detach() for s in state) if isinstance(state, tuple) else state.detach()


@torch.no_grad()
def evaluate(model: CharModel, ids: torch.Tensor, batch: int = 32, seq_len: int = 500) -> float:
    """Mean next-character loss in nats over ``ids`` read as ``batch`` streams with carried state."""
    was_training = model.training
    model.eval()
    x, y = streams(ids, batch)
    total, count, state = 0.0, 0, None
    for t in range(0, x.shape[1], seq_len):
        logits, state = model(x[:, t:t + seq_len].long(), state, return_state=True)
        total += F.cross_entropy(logits.flatten(0, 1), y[:, t:t + seq_len].long().flatten(), reduction="sum").item()
        count += y[:, t:t + seq_len].numel()
    model.train(was_training)
    return total / count


def _optimizer(c: TrainConfig, model: CharModel) -> torch.optim.Optimizer:
    if c.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=c.lr)
    if c.optimizer == "rmsprop":
        return torch.optim.RMSprop(model.parameters(), lr=c.lr, alpha=0.95)
    if c.optimizer == "sgd":        # plain SGD: the update is as large as the gradient (Pascanu et al.'s setting)
        return torch.optim.SGD(model.parameters(), lr=c.lr)
    raise RnnscopeError(f"unknown optimizer {c.optimizer!r}", "use adam, rmsprop or sgd")


def _save_state(out: Path, model, opt, state, rng: torch.Tensor, progress: dict) -> None:
    """Everything needed to continue bit-for-bit: weights, optimizer moments, carried state, RNG.

    The state goes to a new step-numbered file, then ``progress.json`` is switched to it, then
    older files go: a kill at any instant leaves a consistent pair to resume from.
    """
    tensors = {f"model.{k}": v.detach().clone() for k, v in model.state_dict().items()}
    for idx, st in opt.state_dict()["state"].items():
        for name, v in st.items():
            tensors[f"opt.{idx}.{name}"] = torch.as_tensor(v).clone()
    for i, s in enumerate(state if isinstance(state, tuple) else (state,) if state is not None else ()):
        tensors[f"carry.{i}"] = s.detach().clone()
    tensors["rng"] = rng
    d = out / STATE_DIR
    name = f"state-{progress['step']:08d}.safetensors"
    atomic_write(d / name, lambda p: save_file(tensors, str(p)))
    progress = dict(progress, state_file=name, state_sha=checkpoint.sha256_file(d / name))
    atomic_write(d / "progress.json", lambda p: p.write_text(json.dumps(progress)))
    for old in d.glob("state-*.safetensors"):
        if old.name != name:
            old.unlink()


def _load_state(out: Path, model, opt) -> tuple[object, dict]:
    d = out / STATE_DIR
    try:
        progress = json.loads((d / "progress.json").read_text())
        ok = progress["state_sha"] == checkpoint.sha256_file(d / progress["state_file"])
        tensors = load_file(str(d / progress["state_file"]))
    except Exception as err:   # any damage means the same thing to the user
        raise RnnscopeError(f"the training state in {d} is unreadable ({type(err).__name__})",
                            "pass --fresh to start over, or restore that folder") from None
    if not ok:
        raise RnnscopeError(f"the training state in {d} does not match its checksum (damaged on disk)",
                            "pass --fresh to start over, or restore that folder")
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    opt_sd = opt.state_dict()
    for key, v in tensors.items():
        if key.startswith("opt."):
            _, idx, name = key.split(".", 2)
            opt_sd["state"].setdefault(int(idx), {})[name] = v
    opt.load_state_dict(opt_sd)
    torch.set_rng_state(tensors["rng"])
    carry = [tensors[f"carry.{i}"] for i in range(2) if f"carry.{i}" in tensors]
    state = tuple(carry) if len(carry) == 2 else (carry[0] if carry else None)
    return state, progress


def train(c: TrainConfig, out: Path, data: Corpus | None = None, fresh: bool = False, threads: int = 0) -> Path:
    """Train into ``out``; resumes from ``out/train_state`` when present (unless ``fresh``).
    ``threads``: torch's thread count for the run (0: leave torch's own).

    Writes ``out/weights.safetensors`` + ``out/card.json`` when done. Ctrl-C saves a resumable
    state first. Returns ``out``.
    """
    if threads:
        torch.set_num_threads(threads)
    out = Path(out)
    data = data or get_corpus(c.corpus)
    manifest = data.manifest
    texts = {s: data.text(s) for s in ("train", "val", "test")}
    vocab = Vocab("".join(sorted(set("".join(texts.values())))))
    ids = {s: vocab.encode(t)[0].to(torch.uint8) for s, t in texts.items()}
    arch = Architecture(c.arch, len(vocab), c.embed, c.hidden, c.layers, c.dropout)

    saved_config = out / STATE_DIR / "config.json"
    if fresh and (out / STATE_DIR).exists():
        shutil.rmtree(out / STATE_DIR)
        shutil.rmtree(out / WATCH_DIR, ignore_errors=True)     # the old run's history, not this one's
    resuming = (out / STATE_DIR / "progress.json").exists()
    if saved_config.exists() and _fixed(json.loads(saved_config.read_text())) != _fixed(asdict(c)):
        raise RnnscopeError(f"{out} holds a training run with a different configuration",
                            "use the same options to resume, --fresh to start over, or another --out")
    torch.manual_seed(c.seed)
    model = CharModel(arch).train()
    opt = _optimizer(c, model)
    x, y = streams(ids["train"], c.batch)
    steps_per_epoch = x.shape[1] // c.seq_len
    state, progress = None, {"step": 0, "curve": [], "grad_norm": [], "seconds": 0.0}
    if resuming:
        state, progress = _load_state(out, model, opt)
    else:
        atomic_write(saved_config, lambda p: p.write_text(json.dumps(asdict(c))))

    def save_progress():
        # the RNG as it stood when the step about to run began (an interrupted step drew from it)
        _save_state(out, model, opt, state, rng, progress)

    chars_per_step = c.batch * c.seq_len
    bar = tqdm(total=c.steps * chars_per_step, initial=progress["step"] * chars_per_step, unit="ch",
               unit_scale=True, desc=f"{c.arch}-{c.corpus}", smoothing=0.05, mininterval=1.0)
    started = time.time() - progress["seconds"]
    interrupted = False
    rng = torch.get_rng_state()
    watch = _watch(model, out, c)
    old_handler = signal.signal(signal.SIGTERM, signal.default_int_handler)   # kill -TERM saves too
    try:
        while progress["step"] < c.steps:
            step = progress["step"]
            rng = torch.get_rng_state()
            epoch, window = divmod(step, steps_per_epoch)
            if window == 0:
                state = None                      # a new pass over the streams starts from zeros
            t = window * c.seq_len
            xb, yb = x[:, t:t + c.seq_len].long(), y[:, t:t + c.seq_len].long()
            for group in opt.param_groups:
                group["lr"] = learning_rate(c, step)
            with watch.step(step) if watch else nullcontext():
                logits, new_state = model(xb, state, return_state=True)
                loss = F.cross_entropy(logits.flatten(0, 1), yb.flatten())
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if watch:
                    watch.loss(loss)
            clip = watch.clip_grad_norm_ if watch else torch.nn.utils.clip_grad_norm_
            # --clip 0: no clipping (the norm is still measured; an inf max_norm scales by 1)
            norm = clip(model.parameters(), c.clip if c.clip > 0 else float("inf")).item()
            opt.step()
            state = detach(new_state)
            progress["grad_norm"].append(float(f"{norm:.4g}"))
            progress["step"] = step + 1
            progress["seconds"] = time.time() - started
            point = {"step": step + 1, "epoch": round(epoch + (window + 1) / steps_per_epoch, 3),
                     "train_loss": round(loss.item(), 4), "lr": float(f"{learning_rate(c, step):.4g}")}
            if (step + 1) % c.val_every == 0 or step + 1 == c.steps:
                point["val_loss"] = round(evaluate(model, ids["val"]), 4)
            if (step + 1) % 50 == 0 or "val_loss" in point:
                progress["curve"].append(point)
            bar.update(chars_per_step)
            bar.set_postfix(loss=f"{loss.item():.3f}", bpc=f"{bits(loss.item()):.3f}",
                            val=progress["curve"][-1].get("val_loss", "-") if progress["curve"] else "-")
            if (step + 1) % c.checkpoint_every == 0:
                rng = torch.get_rng_state()
                save_progress()
    except KeyboardInterrupt:
        interrupted = True
    finally:
        signal.signal(signal.SIGTERM, old_handler)
        bar.close()
        if watch:
            watch.close()
    if interrupted:
        save_progress()
        raise RnnscopeError(f"training interrupted at step {progress['step']} of {c.steps}; state saved in "
                            f"{out / STATE_DIR}", "run the same command again to resume")
    rng = torch.get_rng_state()
    save_progress()
    val_loss, test_loss = evaluate(model, ids["val"]), evaluate(model, ids["test"])
    split = manifest["splits"]
    card = {
        "name": f"{c.arch}-{c.corpus}",
        "corpus": {"name": c.corpus, "source": manifest["source"],
                   **{f"{s}_chars": split[s]["chars"] for s in split},
                   **{f"{s}_sha256": split[s]["sha256"] for s in split},
                   "split": "by file, SHA-1 order, 10% test / 10% val by characters"},
        "training": {**asdict(c), "chars_seen": progress["step"] * chars_per_step,
                     "steps_done": progress["step"], "seconds": round(progress["seconds"], 1),
                     "threads": torch.get_num_threads(), "torch": torch.__version__,
                     "curve": progress["curve"], "grad_norm_preclip": progress["grad_norm"]},
        "val_loss": round(val_loss, 4), "val_bpc": round(bits(val_loss), 4),
        "test_loss": round(test_loss, 4), "test_bpc": round(bits(test_loss), 4),
    }
    checkpoint.save(model, vocab, card, out)
    return out


def _fixed(config: dict) -> dict:
    return {k: v for k, v in config.items() if k not in _FREE}


def _watch(model, out: Path, c: TrainConfig):
    """The run's watch log in ``OUT/watch``, continued on resume (steps redone after a kill are flagged)."""
    if not c.watch_every:
        return None
    from rnnscope.probe.watch import Watch     # the probe layer, imported only when a run watches
    return Watch(model, out / WATCH_DIR, every=c.watch_every, flush_every=1)
