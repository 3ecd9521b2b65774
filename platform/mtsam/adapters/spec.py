"""``AdapterSpec``: the plain, validated description of one adapter method and its sizes.

Built once at the edge (from the config) and passed to :func:`mtsam.adapters.inject.inject_adapters`;
also written to ``adapter.json`` so saved adapters can be rebuilt without the config file.
Field names match the ``adapter`` section of the experiment config.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

METHODS = ("tora", "lora_stl", "lora_hps", "conv_lora")
DECOMPOSITIONS = ("tucker", "cp")
TARGETS = ("qkv", "proj", "mlp")
QKV_PARTS = ("q", "k", "v")


class AdapterSpecError(ValueError):
    """A field of an :class:`AdapterSpec` is invalid; the message names the field."""


@dataclass(frozen=True)
class AdapterSpec:
    """One adapter method and its hyper-parameters.

    Attributes:
        method: ``tora`` (tensorised, shared across tasks), ``lora_stl`` (one LoRA per task),
            ``lora_hps`` (one LoRA shared by all tasks) or ``conv_lora`` (one shared LoRA with a
            mixture of convolutional experts in its bottleneck). "No adapter" is ``adapter=None``
            in ``build_msam``, not a method here.
        decomposition: ToRA's tensor form, ``tucker`` (ranks r1, r2, r3) or ``cp`` (rank).
        r1, r2, r3: ToRA Tucker ranks along input, output and task dimensions.
        rank: LoRA / Conv-LoRA rank r, and ToRA's CP rank.
        alpha: LoRA / Conv-LoRA alpha; their update is scaled by alpha / rank.
        scaling: ToRA's scale s of the update (both decompositions).
        dropout: dropout probability on the adapter branch input (all methods).
        targets: encoder linears to adapt in every block: ``qkv`` (``attn.qkv``), ``proj``
            (``attn.proj``), ``mlp`` (``mlp.lin1`` and ``mlp.lin2``).
        qkv_parts: which thirds of the fused qkv output receive the update (the rest gets zeros).
        conv_experts: Conv-LoRA's number of experts M (expert i works at scale factor i).
    """

    method: str = "tora"
    decomposition: str = "tucker"
    r1: int = 32
    r2: int = 32
    r3: int = 4
    rank: int = 4
    alpha: float = 8.0
    scaling: float = 0.5
    dropout: float = 0.1
    targets: tuple[str, ...] = ("qkv",)
    qkv_parts: tuple[str, ...] = ("q", "k", "v")
    conv_experts: int = 8

    def __post_init__(self) -> None:
        for name in ("targets", "qkv_parts"):
            value = getattr(self, name)
            if isinstance(value, str):
                raise AdapterSpecError(
                    f"adapter spec field {name!r}: expected a list of names, got the string {value!r}"
                )
            # Lists from JSON / YAML become tuples so the spec stays hashable and comparable.
            object.__setattr__(self, name, tuple(value))
        self._validate()

    def _validate(self) -> None:
        _choice("method", self.method, METHODS, hint="use adapter=None for no adapter")
        _choice("decomposition", self.decomposition, DECOMPOSITIONS)
        for name in ("r1", "r2", "r3", "rank", "conv_experts"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise AdapterSpecError(
                    f"adapter spec field {name!r}: expected an int >= 1, got {value!r}"
                )
        if not _is_number(self.alpha) or self.alpha <= 0:
            raise AdapterSpecError(
                f"adapter spec field 'alpha': expected a number > 0, got {self.alpha!r}"
            )
        if not _is_number(self.scaling):
            raise AdapterSpecError(
                f"adapter spec field 'scaling': expected a number, got {self.scaling!r}"
            )
        if not _is_number(self.dropout) or not 0.0 <= self.dropout < 1.0:
            raise AdapterSpecError(
                f"adapter spec field 'dropout': expected a number in [0, 1), got {self.dropout!r}"
            )
        _subset("targets", self.targets, TARGETS)
        _subset("qkv_parts", self.qkv_parts, QKV_PARTS)

    @property
    def variant(self) -> str:
        """Registry key of the adapter class: the method, with ToRA's decomposition spelled out."""
        if self.method == "tora":
            return f"tora_{self.decomposition}"
        return self.method

    @property
    def lora_scale(self) -> float:
        """LoRA / Conv-LoRA update scale alpha / rank."""
        return float(self.alpha) / self.rank

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples become lists)."""
        d = asdict(self)
        d["targets"] = list(self.targets)
        d["qkv_parts"] = list(self.qkv_parts)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AdapterSpec:
        """Inverse of :meth:`to_dict`; unknown keys are an error naming them."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise AdapterSpecError(
                f"adapter spec: unknown fields {unknown}; expected some of {sorted(known)}"
            )
        return cls(**d)


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _choice(name: str, value: object, allowed: tuple[str, ...], hint: str = "") -> None:
    if value not in allowed:
        extra = f" ({hint})" if hint else ""
        raise AdapterSpecError(
            f"adapter spec field {name!r}: expected one of {list(allowed)}, got {value!r}{extra}"
        )


def _subset(name: str, values: tuple[str, ...], allowed: tuple[str, ...]) -> None:
    if not values:
        raise AdapterSpecError(
            f"adapter spec field {name!r}: expected at least one of {list(allowed)}"
        )
    bad = [v for v in values if v not in allowed]
    if bad:
        raise AdapterSpecError(f"adapter spec field {name!r}: {bad} not in {list(allowed)}")
    if len(set(values)) != len(values):
        raise AdapterSpecError(f"adapter spec field {name!r}: duplicate entries in {list(values)}")
