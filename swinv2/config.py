"""SwinV2 configuration: one dataclass plus the paper's variant table (T/S/B/L/H/G)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, NamedTuple

NORM_STYLES = ("res_post", "pre")
ATTN_TYPES = ("cosine", "dot")
ATTENTION_KERNELS = ("reference", "fused", "sequential")

# Head dim is 32 everywhere. H/G head counts are not given in the paper (unverified; these
# follow timm's swinv2_cr guesses). H/G get the paper's extra main-branch LayerNorm every 6 blocks.
VARIANTS: dict[str, dict[str, Any]] = {
    "tiny": dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24)),
    "small": dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24)),
    "base": dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32)),
    "large": dict(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48)),
    "huge": dict(embed_dim=352, depths=(2, 2, 18, 2), num_heads=(11, 22, 44, 88), extra_norm_every=6),
    "giant": dict(embed_dim=512, depths=(2, 2, 42, 4), num_heads=(16, 32, 64, 128), extra_norm_every=6),
    # Not from the paper: the trainer's embedded default (a smoke run on a CPU in about a minute);
    # the tiny layout at C=32 with one or two blocks per stage, head dim 32 as above.
    "toy": dict(embed_dim=32, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8)),
}
PAPER_VARIANTS = ("tiny", "small", "base", "large", "huge", "giant")
# The fields a variant sets: its architecture (a variant name means these sizes unless given too).
VARIANT_FIELDS = tuple(sorted({k for sizes in VARIANTS.values() for k in sizes}))


class WindowGeometry(NamedTuple):
    """Effective attention window of a stage, the shift of its odd (SW-MSA) blocks, and the tokens
    padded at the bottom/right of the map so the window tiles it (0 unless pad_to_window)."""

    window: int
    shift: int
    pad: int = 0

    def block_shift(self, block_in_stage: int) -> int:
        """Blocks alternate regular (even) and shifted (odd) windows."""
        return self.shift if block_in_stage % 2 else 0

    def padded(self, resolution: int) -> int:
        """The side of the attended map: the stage resolution plus the padding."""
        return resolution + self.pad


def window_geometry(resolution: int, window_size: int, pad_to_window: bool = False) -> WindowGeometry:
    """The official window-clipping rule, decided here only (model, flops and the memory model use it).

    A map no larger than the window is attended as ONE window covering it; shifting a single
    window would only move tokens around it, so there is no shift. Otherwise the configured window,
    shifted by half of it in the odd blocks. A larger map the window does not tile is padded up to a
    multiple of it when `pad_to_window` (the official detection backbone's approach; the padded
    tokens are masked out of attention), else left as is (validation rejects it)."""
    if resolution <= window_size:
        return WindowGeometry(resolution, 0)
    pad = -resolution % window_size if pad_to_window else 0
    return WindowGeometry(window_size, window_size // 2, pad)


# Fields that say how the model runs, not which weights it has: a checkpoint resumes under any value.
RUNTIME = {"runtime": True}


@dataclass
class SwinV2Config:
    img_size: int = 256
    patch_size: int = 4
    in_chans: int = 3
    num_classes: int = 1000
    embed_dim: int = 96
    depths: tuple[int, ...] = (2, 2, 6, 2)
    num_heads: tuple[int, ...] = (3, 6, 12, 24)
    window_size: int = 8
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    drop_rate: float = field(default=0.0, metadata=RUNTIME)
    attn_drop_rate: float = field(default=0.0, metadata=RUNTIME)
    drop_path_rate: float = field(default=0.1, metadata=RUNTIME)
    pretrained_window_sizes: tuple[int, ...] = (0, 0, 0, 0)
    norm_style: str = "res_post"
    attn_type: str = "cosine"
    extra_norm_every: int = 0
    attention: str = field(default="reference", metadata=RUNTIME)
    sequential_chunk: int = field(default=32, metadata=RUNTIME)  # windows per chunk for the "sequential" kernel
    # pad a stage map the window does not tile to a multiple of it (padded tokens masked out of
    # attention, cropped after): the paper's W32 at 1536^2 (stage 4 is 48x48). Off: official classifier.
    pad_to_window: bool = False

    def __post_init__(self) -> None:
        # Hydra/OmegaConf hand over lists; keep tuples so configs compare and hash predictably.
        for name in ("depths", "num_heads", "pretrained_window_sizes"):
            setattr(self, name, tuple(int(v) for v in getattr(self, name)))
        self.validate()

    @classmethod
    def from_variant(cls, variant: str, **overrides: Any) -> "SwinV2Config":
        if variant not in VARIANTS:
            raise ValueError(f"variant: unknown variant {variant!r}; valid variants: {', '.join(VARIANTS)}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"{unknown[0]}: unknown SwinV2Config field(s) {unknown}; valid fields: {sorted(known)}")
        return cls(**{**VARIANTS[variant], **overrides})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    # ---- derived geometry (shared by the model, flops and validation) ----
    @property
    def num_stages(self) -> int:
        return len(self.depths)

    @property
    def patches_resolution(self) -> int:
        return self.img_size // self.patch_size

    def stage_dim(self, i: int) -> int:
        return self.embed_dim * 2**i

    def stage_resolution(self, i: int) -> int:
        return self.patches_resolution // 2**i

    def stage_window(self, i: int) -> WindowGeometry:
        """(window, shift, pad) of stage i after the official clipping rule (:func:`window_geometry`)."""
        return window_geometry(self.stage_resolution(i), self.window_size, self.pad_to_window)

    @property
    def num_features(self) -> int:
        return self.stage_dim(self.num_stages - 1)

    def validate(self) -> "SwinV2Config":
        """Raise ValueError("<field>: why") for the first invalid field; return self."""
        self._validate_choices()
        self._validate_ranges()
        self._validate_stages()
        self._validate_geometry()
        return self

    def _validate_choices(self) -> None:
        for name, valid, what in (("norm_style", NORM_STYLES, "norm style"), ("attn_type", ATTN_TYPES, "attention type"),
                                  ("attention", ATTENTION_KERNELS, "attention kernel")):
            if getattr(self, name) not in valid:
                _bad(name, f"unknown {what} {getattr(self, name)!r}; valid: {', '.join(valid)}")

    def _validate_ranges(self) -> None:
        for name in ("img_size", "patch_size", "in_chans", "embed_dim", "window_size", "sequential_chunk"):
            if int(getattr(self, name)) < 1:
                _bad(name, f"must be >= 1, got {getattr(self, name)}")
        if self.num_classes < 0:
            _bad("num_classes", f"must be >= 0 (0 = no head), got {self.num_classes}")
        if self.extra_norm_every < 0:
            _bad("extra_norm_every", f"must be >= 0 (0 = off), got {self.extra_norm_every}")
        if self.mlp_ratio <= 0:
            _bad("mlp_ratio", f"must be > 0, got {self.mlp_ratio}")
        for name in ("drop_rate", "attn_drop_rate", "drop_path_rate"):
            if not 0.0 <= getattr(self, name) < 1.0:
                _bad(name, f"must be in [0, 1), got {getattr(self, name)}")

    def _validate_stages(self) -> None:
        n = len(self.depths)
        if n == 0:
            _bad("depths", "needs at least one stage")
        if len(self.num_heads) != n:
            _bad("num_heads", f"has {len(self.num_heads)} entries but depths has {n}")
        if len(self.pretrained_window_sizes) != n:
            _bad("pretrained_window_sizes", f"has {len(self.pretrained_window_sizes)} entries but depths has {n}")
        if any(d < 1 for d in self.depths):
            _bad("depths", f"every stage needs >= 1 block, got {self.depths}")
        if any(p < 0 for p in self.pretrained_window_sizes):
            _bad("pretrained_window_sizes", f"must be >= 0 (0 = this window), got {self.pretrained_window_sizes}")
        for i, h in enumerate(self.num_heads):
            if h < 1 or self.stage_dim(i) % h:
                _bad("num_heads", f"stage {i} dim {self.stage_dim(i)} is not divisible by {h} heads")

    def _validate_geometry(self) -> None:
        n = self.num_stages
        if self.img_size % self.patch_size:
            _bad("img_size", f"{self.img_size} is not divisible by patch_size {self.patch_size}")
        pr = self.patches_resolution
        if pr % 2 ** (n - 1):
            _bad("img_size", f"{self.img_size}: patch grid {pr} must be divisible by {2 ** (n - 1)} "
                 "so every patch merging sees an even resolution")
        for i in range(n):
            res, geo = self.stage_resolution(i), self.stage_window(i)
            if geo.padded(res) % geo.window:
                _bad("window_size", f"stage {i} resolution {res} is neither <= window {self.window_size} "
                     f"nor divisible by it (img_size={self.img_size}); pad_to_window pads it")


# The model's defaults, for the modules that can also be built on their own (a block, an attention
# layer): their signatures read these instead of restating the values.
DEFAULTS = SwinV2Config()


RUNTIME_FIELDS = tuple(f.name for f in fields(SwinV2Config) if f.metadata.get("runtime"))


def _bad(field: str, msg: str) -> None:
    # "<field>: why": the trainer maps the field to its model.<field> config key
    raise ValueError(f"{field}: {msg}")
