"""A short LoRA fine-tune of a tiny Llama-style causal LM built from a config: no downloads.

Heavy imports (torch, transformers, peft) live here; ``pytest_repro.jobs`` loads this module only
inside the job's process.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import checkpoint
from ..schema import field, validate
from ..splits import load_split
from . import PACKAGED, packaged_file

if TYPE_CHECKING:
    import torch

    from ..context import JobContext

DTYPES = ("float32", "bfloat16", "float16", "float64")


@dataclass(frozen=True)
class ModelConfig:
    """Size of the tiny Llama-style model."""

    hidden_size: int = field(64, gt=0)
    num_layers: int = field(2, gt=0)
    num_heads: int = field(4, gt=0)
    intermediate_size: int = field(128, gt=0)
    max_position_embeddings: int = field(64, gt=0)


@dataclass(frozen=True)
class LoraSettings:
    """LoRA adapter settings."""

    rank: int = field(8, gt=0)
    alpha: int = field(16, gt=0)
    dropout: float = field(0.05, ge=0, lt=1)
    target_modules: list[str] = field(["q_proj", "v_proj"])


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings."""

    lr: float = field(1e-3, gt=0)
    steps: int = field(24, gt=0)
    batch_size: int = field(8, gt=0)
    seq_len: int = field(16, gt=2)
    weight_decay: float = field(0.0, ge=0)


@dataclass(frozen=True)
class DataConfig:
    """Where the corpus, its static split file and the tokenizer live (relative to the config file)."""

    corpus: str = field(PACKAGED + "corpus.jsonl")
    splits: str = field(PACKAGED + "splits_v1.json")
    tokenizer: str = field(PACKAGED + "tokenizer.json")


@dataclass(frozen=True)
class LoraJobConfig:
    """The built-in LoRA job's whole config."""

    model: ModelConfig = field(ModelConfig())
    lora: LoraSettings = field(LoraSettings())
    train: TrainConfig = field(TrainConfig())
    data: DataConfig = field(DataConfig())
    dtype: str = field("float32", choices=DTYPES)

    def derived(self) -> dict[str, Any]:
        """Values computed from the config, recorded with provenance tag ``derived``."""
        return {
            "lora": {"scaling": self.lora.alpha / self.lora.rank},
            "train": {
                "examples_seen": self.train.steps * self.train.batch_size,
                "tokens_per_step": self.train.batch_size * self.train.seq_len,
            },
        }


def parse_config(raw: dict[str, Any]) -> LoraJobConfig:
    """Validate the job config before any work starts."""
    cfg = validate(LoraJobConfig, raw, "lora_finetune config")
    if cfg.model.hidden_size % cfg.model.num_heads:
        from ..schema import ConfigError

        raise ConfigError(
            [f"model.hidden_size: {cfg.model.hidden_size} is not divisible by model.num_heads={cfg.model.num_heads}"],
            "lora_finetune config",
        )
    return cfg


@dataclass
class Prepared:
    """Model, data tensors and config, ready to train."""

    cfg: LoraJobConfig
    model: Any
    train: dict[str, torch.Tensor]
    eval: dict[str, torch.Tensor]
    probe: dict[str, torch.Tensor]
    split_sha256: str


def _encode(texts: list[str], tokenizer: Any, seq_len: int) -> dict[str, torch.Tensor]:
    import torch

    pad, bos, eos = (tokenizer.token_to_id(t) for t in ("[PAD]", "[BOS]", "[EOS]"))
    ids = torch.full((len(texts), seq_len), pad, dtype=torch.long)
    for i, text in enumerate(texts):
        tokens = [bos, *tokenizer.encode(text).ids, eos][:seq_len]
        ids[i, : len(tokens)] = torch.tensor(tokens)
    mask = (ids != pad).long()
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def data_path(ctx: JobContext, value: str, key: str = "data") -> Path:
    """Resolve a data path of the config: ``package:NAME`` is the tiny data shipped with pytest-repro."""
    if value.startswith(PACKAGED):
        return packaged_file(value)
    path = ctx.path(value)
    if not path.is_file():
        where = (
            f"the config file's folder {ctx.config_dir}" if ctx.config_dir is not None else f"the rootdir {Path.cwd()}"
        )
        shipped = PACKAGED + Path(value).name
        raise FileNotFoundError(
            f"{key}: {value!r} is not a file (relative paths are taken from {where}); give the path to your data "
            f"file, or {shipped!r} for the tiny data shipped with pytest-repro"
        )
    return path


def prepare(ctx: JobContext) -> Prepared:
    """Validate the config, load the split and tokenizer, and build the LoRA-wrapped model on ctx.device."""
    import torch
    from peft import LoraConfig, get_peft_model
    from tokenizers import Tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = parse_config(ctx.config)
    split = load_split(data_path(ctx, cfg.data.splits, "data.splits"), data_path(ctx, cfg.data.corpus, "data.corpus"))
    tokenizer = Tokenizer.from_file(str(data_path(ctx, cfg.data.tokenizer, "data.tokenizer")))
    data = {
        name: _encode([r["text"] for r in rows], tokenizer, cfg.train.seq_len) for name, rows in split.splits.items()
    }
    m = cfg.model
    config = LlamaConfig(
        vocab_size=tokenizer.get_vocab_size(),
        hidden_size=m.hidden_size,
        intermediate_size=m.intermediate_size,
        num_hidden_layers=m.num_layers,
        num_attention_heads=m.num_heads,
        num_key_value_heads=m.num_heads,
        max_position_embeddings=m.max_position_embeddings,
        pad_token_id=tokenizer.token_to_id("[PAD]"),
        bos_token_id=tokenizer.token_to_id("[BOS]"),
        eos_token_id=tokenizer.token_to_id("[EOS]"),
        tie_word_embeddings=False,
    )
    dtype = getattr(torch, cfg.dtype)
    base: Any = LlamaForCausalLM(config)
    base = base.to(device=ctx.device, dtype=dtype)
    lora = LoraConfig(
        r=cfg.lora.rank,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=list(cfg.lora.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(base, lora)
    return Prepared(cfg, model, data["train"], data["eval"], data["probe"], split.file_sha256)


def adapter_weights(model: Any) -> dict[str, torch.Tensor]:
    """Return the trainable (adapter) parameters in state-dict order."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def evaluate(model: Any, batch: dict[str, torch.Tensor], device: str) -> float:
    """Return the mean token loss on a batch, without gradients."""
    import torch

    model.eval()
    with torch.no_grad():
        out = model(**{k: v.to(device) for k, v in batch.items()})
    return float(out.loss)


def probe_logits(model: Any, batch: dict[str, torch.Tensor], device: str) -> torch.Tensor:
    """Return float32 logits for the fixed probe batch (the job's benchmark outputs)."""
    import torch

    model.eval()
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
    logits: torch.Tensor = out.logits.float().cpu()
    return logits


def run(ctx: JobContext) -> dict[str, Any]:
    """Train with a plain loop and return losses, adapter weights, eval metrics and probe logits."""
    import torch

    p = prepare(ctx)
    t = p.cfg.train
    trainable = [q for q in p.model.parameters() if q.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=t.lr, weight_decay=t.weight_decay)
    sampler = torch.Generator().manual_seed(ctx.seed)
    n = p.train["input_ids"].shape[0]
    losses: list[float] = []  # of the steps run in this process (a resumed run starts at its checkpoint)
    start = 0
    if ctx.resume_from is not None:
        restored = checkpoint.load(ctx.resume_from, model=p.model, optimizer=optimizer)
        start = restored["step"]
        sampler.set_state(restored["extra"]["sampler"])  # the data position
    end = ctx.stop_at if ctx.stop_at is not None else t.steps
    p.model.train()
    for _ in range(start, end):
        idx = torch.randint(n, (t.batch_size,), generator=sampler)
        batch = {k: v[idx].to(ctx.device) for k, v in p.train.items()}
        loss = p.model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    if ctx.stop_at is not None:
        extra = {"sampler": sampler.get_state()}
        checkpoint.save(ctx.checkpoint_dir or ctx.workdir, step=end, model=p.model, optimizer=optimizer, extra=extra)
    eval_loss = evaluate(p.model, p.eval, ctx.device)
    return {
        "meta": {"split_sha256": p.split_sha256},
        "losses": losses,
        "weights": adapter_weights(p.model),
        "metrics": {"eval_loss": eval_loss, "perplexity": math.exp(eval_loss)},
        "outputs": {"probe_logits": probe_logits(p.model, p.probe, ctx.device)},
    }
