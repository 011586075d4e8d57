"""Model configuration: one serializable dataclass, validated on construction, plus named presets.

Every field is documented where it is declared; the command line builds its ``--model.FIELD`` flags
and their help text from these declarations (see :func:`field_docs`), so the two cannot disagree.

The helpers at the bottom (:func:`from_dict`, :func:`to_dict`, :func:`load_config_file`) work for any
config dataclass of the project, so the training config reuses them.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from .errors import ConfigError

ATTN_BACKENDS = ("sdpa", "flex", "eager")
MAX_SEED = 2**63 - 1
"""Seeds are integers in [0, MAX_SEED] everywhere (torch generators take 64-bit seeds)."""
LAYERDROP_SCHEDULES = ("constant", "linear")
MOE_DISPATCH = ("auto", "eager", "sorted", "grouped_mm", "gathered")


@dataclass
class ModelConfig:
    """Architecture of a decoder-only transformer (dense or mixture of experts)."""

    # --- sizes -------------------------------------------------------------------------------
    vocab_size: int = 8192
    """Number of token ids; the embedding and LM head have this many rows."""
    d_model: int = 384
    """Width of the residual stream."""
    n_layers: int = 6
    """Number of transformer blocks."""
    n_heads: int = 6
    """Number of query heads."""
    n_kv_heads: int = 2
    """Number of key/value heads (grouped-query attention): equal to n_heads is MHA, 1 is MQA."""
    head_dim: Optional[int] = None
    """Width of one attention head; None means d_model // n_heads."""
    ffn_dim: Optional[int] = None
    """Hidden width of the SwiGLU feed-forward; None means 8/3 * d_model rounded up to a multiple of 64."""
    max_seq_len: int = 256
    """Longest context the model is trained for (RoPE itself has no hard limit)."""

    # --- embeddings, norms, positions ----------------------------------------------------------
    tie_embeddings: bool = True
    """Share one matrix between the token embedding and the LM head."""
    norm_eps: float = 1e-5
    """Epsilon inside RMSNorm's square root."""
    rope_theta: float = 10000.0
    """RoPE base frequency (Su et al. 2021)."""
    attn_bias: bool = False
    """Bias on the q/k/v projections (Qwen2 style); the output projection never has one."""

    # --- attention -----------------------------------------------------------------------------
    attn_backend: str = "sdpa"
    """Attention kernel: 'sdpa' (PyTorch fused), 'flex' (flex_attention with a block mask) or 'eager' (plain math)."""
    sliding_window: Optional[int] = None
    """Window W of sliding-window attention: query i sees keys j with i - W < j <= i. None: full causal attention."""
    window_pattern: Optional[str] = None
    """Per-layer pattern of 'S' (sliding window) and 'L' (full attention), repeated over the layers, e.g. 'SSSL'. None: every layer uses sliding_window."""

    # --- regularisation and training aids -------------------------------------------------------
    dropout: float = 0.0
    """Dropout on attention probabilities and on each sub-layer's output (training only)."""
    rezero: bool = False
    """ReZero (Bachlechner et al. 2020): a learnable scale, initialised to 0, on each sub-layer's residual branch."""
    layerdrop: float = 0.0
    """LayerDrop (Fan et al. 2019): probability of skipping a whole block in training (the deepest block's, when linear)."""
    layerdrop_schedule: str = "linear"
    """'constant': every block has probability layerdrop; 'linear': it grows with depth, reaching layerdrop at the last block."""
    layerdrop_seed: int = 0
    """Seed of the generator that draws LayerDrop decisions (identical on every rank, so DDP stays in step)."""
    grad_checkpointing: bool = False
    """Recompute each block's activations in the backward pass (non-reentrant torch.utils.checkpoint)."""
    init_std: float = 0.02
    """Standard deviation of the normal initialisation; output projections get init_std / sqrt(2 * n_layers)."""

    # --- mixture of experts (n_experts = 0: dense) --------------------------------------------
    n_experts: int = 0
    """Routed experts per MoE layer; 0 makes a dense model."""
    moe_top_k: int = 2
    """Experts each token is routed to."""
    moe_ffn_dim: Optional[int] = None
    """Hidden width of each routed expert; None means ffn_dim."""
    moe_every: int = 1
    """Place an MoE feed-forward on every k-th layer (counted after moe_first_dense)."""
    moe_first_dense: int = 0
    """The first k layers stay dense."""
    moe_renormalize: bool = True
    """Renormalise the top-k routing weights to sum to 1 (Mixtral: yes; Qwen2-MoE: no)."""
    moe_noisy_gating: bool = False
    """Noisy top-k gating (Shazeer et al. 2017): learned, softplus-scaled Gaussian noise on router logits in training."""
    n_shared_experts: int = 0
    """Always-on shared SwiGLU experts added to the routed output (DeepSeek-MoE style)."""
    shared_expert_ffn_dim: Optional[int] = None
    """Hidden width of the shared experts taken together; None means n_shared_experts * moe_ffn_dim."""
    shared_expert_gate: bool = False
    """Scale the shared experts' output by a per-token sigmoid gate (Qwen2-MoE's shared_expert_gate)."""
    moe_aux_loss_coef: float = 0.01
    """Coefficient of the Switch Transformer load-balancing loss."""
    moe_z_loss_coef: float = 0.001
    """Coefficient of the ST-MoE router z-loss."""
    moe_dispatch: str = "auto"
    """Expert dispatch: 'eager' (per-expert loop, the reference), 'sorted' (tokens sorted by expert), 'grouped_mm',
    'gathered' (each token's experts' weights gathered: decoding), 'auto' (see model/moe.py)."""

    def __post_init__(self) -> None:
        problems = []

        def need(ok: bool, message: str) -> None:
            if not ok:
                problems.append(message)

        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "max_seq_len"):
            need(_is_int(getattr(self, name)) and getattr(self, name) >= 1, f"{name} must be a positive integer")
        for name in ("head_dim", "ffn_dim", "moe_ffn_dim", "shared_expert_ffn_dim", "sliding_window"):
            value = getattr(self, name)
            need(value is None or (_is_int(value) and value >= 1), f"{name} must be a positive integer or null")
        if not problems:
            need(self.n_heads % self.n_kv_heads == 0, f"n_heads ({self.n_heads}) must be divisible by n_kv_heads ({self.n_kv_heads})")
            if self.head_dim is None:
                need(self.d_model % self.n_heads == 0, f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads}) when head_dim is not set")
            need(self.resolved_head_dim % 2 == 0, f"head_dim ({self.resolved_head_dim}) must be even for RoPE")
            if self.sliding_window is not None:
                need(self.sliding_window <= self.max_seq_len, f"sliding_window ({self.sliding_window}) must not exceed max_seq_len ({self.max_seq_len})")
        need(self.attn_backend in ATTN_BACKENDS, f"attn_backend must be one of {', '.join(ATTN_BACKENDS)} (got {self.attn_backend!r})")
        need(not (self.attn_backend == "flex" and _is_number(self.dropout) and self.dropout > 0),
             "attn_backend 'flex' does not support attention dropout; use dropout=0 or another backend")
        if self.window_pattern is not None:
            need(isinstance(self.window_pattern, str) and len(self.window_pattern) > 0
                 and set(self.window_pattern) <= {"S", "L"}, "window_pattern must be a non-empty string of 'S' and 'L'")
            need(self.sliding_window is not None, "window_pattern needs sliding_window to be set")
        need(_is_number(self.norm_eps) and self.norm_eps > 0, "norm_eps must be > 0")
        need(_is_number(self.rope_theta) and self.rope_theta > 0, "rope_theta must be > 0")
        need(_is_number(self.init_std) and self.init_std > 0, "init_std must be > 0")
        need(_is_number(self.dropout) and 0 <= self.dropout < 1, "dropout must be in [0, 1)")
        need(_is_number(self.layerdrop) and 0 <= self.layerdrop < 1, "layerdrop must be in [0, 1)")
        need(self.layerdrop_schedule in LAYERDROP_SCHEDULES, f"layerdrop_schedule must be one of {', '.join(LAYERDROP_SCHEDULES)}")
        need(_is_int(self.n_experts) and self.n_experts >= 0, "n_experts must be an integer >= 0")
        need(_is_int(self.n_shared_experts) and self.n_shared_experts >= 0, "n_shared_experts must be an integer >= 0")
        need(_is_int(self.moe_every) and self.moe_every >= 1, "moe_every must be an integer >= 1")
        need(_is_int(self.moe_first_dense) and self.moe_first_dense >= 0, "moe_first_dense must be an integer >= 0")
        if _is_int(self.n_experts) and self.n_experts > 0:
            need(_is_int(self.moe_top_k) and 1 <= self.moe_top_k <= self.n_experts,
                 f"moe_top_k must be between 1 and n_experts ({self.n_experts})")
        need(not (self.shared_expert_gate and self.n_shared_experts == 0),
             "shared_expert_gate needs n_shared_experts >= 1")
        need(self.moe_dispatch in MOE_DISPATCH, f"moe_dispatch must be one of {', '.join(MOE_DISPATCH)}")
        if self.moe_dispatch == "grouped_mm" and not problems:  # grouped_mm needs 16-byte aligned strides
            need(self.d_model % 8 == 0 and self.resolved_moe_ffn_dim % 8 == 0,
                 f"moe_dispatch 'grouped_mm' needs d_model and moe_ffn_dim that are multiples of 8 (got "
                 f"{self.d_model} and {self.resolved_moe_ffn_dim}); use 'auto', which takes another path for them")
        need(_is_int(self.layerdrop_seed) and 0 <= self.layerdrop_seed <= MAX_SEED,
             f"layerdrop_seed must be an integer in [0, {MAX_SEED}]")
        need(_is_number(self.moe_aux_loss_coef) and self.moe_aux_loss_coef >= 0, "moe_aux_loss_coef must be >= 0")
        need(_is_number(self.moe_z_loss_coef) and self.moe_z_loss_coef >= 0, "moe_z_loss_coef must be >= 0")
        if problems:
            raise ConfigError("invalid model config: " + "; ".join(problems))

    # --- derived values (decided once, used by the model's __init__) --------------------------
    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.d_model // self.n_heads

    @property
    def resolved_ffn_dim(self) -> int:
        if self.ffn_dim is not None:
            return self.ffn_dim
        return -(-(8 * self.d_model // 3) // 64) * 64

    @property
    def resolved_moe_ffn_dim(self) -> int:
        return self.moe_ffn_dim if self.moe_ffn_dim is not None else self.resolved_ffn_dim

    @property
    def resolved_shared_ffn_dim(self) -> int:
        if self.shared_expert_ffn_dim is not None:
            return self.shared_expert_ffn_dim
        return self.n_shared_experts * self.resolved_moe_ffn_dim

    def layer_windows(self) -> list[Optional[int]]:
        """The attention window of each layer (None = full causal attention)."""
        if self.sliding_window is None:
            return [None] * self.n_layers
        pattern = self.window_pattern or "S"
        return [self.sliding_window if pattern[i % len(pattern)] == "S" else None for i in range(self.n_layers)]

    def layer_is_moe(self) -> list[bool]:
        """Whether each layer's feed-forward is a mixture of experts."""
        if self.n_experts == 0:
            return [False] * self.n_layers
        return [i >= self.moe_first_dense and (i - self.moe_first_dense) % self.moe_every == 0
                for i in range(self.n_layers)]

    def layerdrop_probs(self) -> list[float]:
        """Probability of skipping each block in training."""
        if self.layerdrop == 0:
            return [0.0] * self.n_layers
        if self.layerdrop_schedule == "constant":
            return [self.layerdrop] * self.n_layers
        return [self.layerdrop * (i + 1) / self.n_layers for i in range(self.n_layers)]

    def to_dict(self) -> dict:
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        return from_dict(cls, data)


# --- presets ---------------------------------------------------------------------------------

MODEL_PRESETS: dict[str, dict[str, Any]] = {
    # Trains in a few minutes on 2 CPU cores.
    "tiny": dict(vocab_size=4096, d_model=192, n_layers=4, n_heads=6, n_kv_heads=2, max_seq_len=128),
    # ~25M parameters.
    "small": dict(vocab_size=8192, d_model=512, n_layers=8, n_heads=8, n_kv_heads=4, max_seq_len=512),
    # GPT-2-small class, ~125M parameters.
    "base": dict(vocab_size=32768, d_model=768, n_layers=12, n_heads=12, n_kv_heads=4, ffn_dim=2048,
                 max_seq_len=1024, tie_embeddings=False),
    # Mixture of experts that trains on 2 CPU cores: 8 experts, top-2, one shared expert.
    "moe-small": dict(vocab_size=4096, d_model=192, n_layers=4, n_heads=6, n_kv_heads=2, max_seq_len=128,
                      n_experts=8, moe_top_k=2, moe_ffn_dim=256, n_shared_experts=1, shared_expert_gate=True),
    # nanoGPT's character-level Shakespeare "baby GPT" size (6 layers, 6 heads, d384, context 256,
    # dropout 0.2), in this architecture; the tokenizer sets the vocabulary (65 characters + specials).
    "shakespeare-char": dict(vocab_size=128, d_model=384, n_layers=6, n_heads=6, n_kv_heads=6, max_seq_len=256,
                             dropout=0.2),
    # nanoGPT's "I only have a macbook" variant of it: 4 layers, 4 heads, d128, context 64, no dropout.
    "shakespeare-char-cpu": dict(vocab_size=128, d_model=128, n_layers=4, n_heads=4, n_kv_heads=4, max_seq_len=64),
}
MODEL_PRESETS["shakespeare-char-cpu-muon"] = MODEL_PRESETS["shakespeare-char-cpu"]  # trained with Muon


def model_preset(name: str, **overrides: Any) -> ModelConfig:
    """The named preset's ModelConfig, with optional field overrides."""
    if name not in MODEL_PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(MODEL_PRESETS)}")
    return ModelConfig(**{**MODEL_PRESETS[name], **overrides})


# --- generic helpers for config dataclasses ---------------------------------------------------

def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def to_dict(config: Any) -> dict:
    """A config dataclass as a plain JSON-ready dict."""
    return dataclasses.asdict(config)


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(name: str, value: Any, annotation: Any) -> Any:
    """Check (and gently convert) one value against its annotation; raise TypeError naming the field."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        errors = []
        for arg in non_none:
            try:
                return _coerce(name, value, arg)
            except TypeError as exc:
                errors.append(str(exc))
        raise TypeError(errors[0])
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise TypeError(f"{name} must be true or false (got {value!r})")
    if annotation is int:
        if _is_int(value):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise TypeError(f"{name} must be an integer (got {value!r})")
    if annotation is float:
        if _is_number(value):
            return float(value)
        raise TypeError(f"{name} must be a number (got {value!r})")
    if annotation is str:
        if isinstance(value, str):
            return value
        raise TypeError(f"{name} must be a string (got {value!r})")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"{name} must be a list (got {value!r})")
        if args and args[0] is not Ellipsis:
            item_type = args[0]
            value = [_coerce(f"{name}[{i}]", v, item_type) for i, v in enumerate(value)]
        return list(value) if origin is list else tuple(value)
    if origin is dict:
        if not isinstance(value, dict):
            raise TypeError(f"{name} must be a mapping (got {value!r})")
        return dict(value)
    if dataclasses.is_dataclass(annotation):
        if isinstance(value, annotation):
            return value
        if not isinstance(value, dict):
            raise TypeError(f"{name} must be a mapping (got {value!r})")
        return from_dict(annotation, value, prefix=f"{name}.")
    return value


def from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    """Build config dataclass ``cls`` from a dict, reporting every unknown key and type error at once."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or cls.__name__} must be a mapping")
    hints = _field_types(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    problems = [f"unknown key {prefix}{key!r}" for key in data if key not in names]
    problems += [f"missing key {prefix}{f.name!r}" for f in dataclasses.fields(cls) if f.name not in data
                 and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            continue
        try:
            kwargs[key] = _coerce(prefix + key, value, hints[key])
        except TypeError as exc:
            problems.append(str(exc))
        except ConfigError as exc:
            problems.append(str(exc))
    if problems:
        raise ConfigError("invalid config: " + "; ".join(problems))
    return cls(**kwargs)


_BOOL_WORDS = {"true": True, "yes": True, "1": True, "on": True, "false": False, "no": False, "0": False, "off": False}


def parse_field_value(cls: type, name: str, text: str, prefix: str) -> Any:
    """A command-line string for field ``name`` of config dataclass ``cls``, typed by the field's annotation.

    Numbers accept any Python number literal (``3e-4``), booleans true/false/yes/no/1/0/on/off, optional
    fields ``none``/``null``, lists and nested configs YAML/JSON (``'[{seq_len: 64, batch_size: 8}]'``).
    The text is only turned into a plain value here; :func:`from_dict` then checks it against the
    field's type, the same check a config file's values get. Raises ConfigError naming the flag.
    """
    annotation = typing.get_type_hints(cls)[name]
    flag = f"--{prefix}{name}"
    args = typing.get_args(annotation)
    if type(None) in args:
        if text.strip().lower() in ("none", "null"):
            return None
        annotation = next(a for a in args if a is not type(None))
    try:
        if annotation is str:
            return text
        if annotation is bool:
            return _BOOL_WORDS[text.strip().lower()]
        if annotation in (int, float):
            return int(text) if annotation is int else float(text)
        import yaml

        return yaml.safe_load(text)  # lists, nested configs: checked field by field by from_dict
    except Exception:  # noqa: BLE001 - the parsers raise several types; all mean "not this type"
        kind = getattr(annotation, "__name__", str(annotation))
        raise ConfigError(f"{flag}: cannot parse {text!r} as {kind}") from None


def load_config_file(path: str | Path) -> dict:
    """Read a YAML or JSON config file into a dict (the caller picks the sections it knows)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as exc:  # the parsers raise several types; all mean a malformed file
        raise ConfigError(f"cannot parse config file {path}: {str(exc).splitlines()[0]}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return data


def field_docs(cls: type) -> dict[str, str]:
    """Each field's docstring (the string literal right after its declaration), read from the source."""
    import ast
    import inspect

    source = inspect.getsource(cls)
    tree = ast.parse(source)
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, following in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant) \
                    and isinstance(following.value.value, str):
                docs[node.target.id] = " ".join(following.value.value.split())
    return docs


__all__ = ["ModelConfig", "MODEL_PRESETS", "model_preset", "from_dict", "to_dict", "load_config_file",
           "field_docs", "parse_field_value"]
