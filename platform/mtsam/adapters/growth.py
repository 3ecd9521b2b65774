"""Trainable-parameter growth with the number of tasks: ToRA vs one LoRA per task vs shared LoRA.

Formula-based (no model is built): the adapters on the encoder's target linears of SAM's ViT-B,
ViT-L and ViT-H. ToRA's shared factors and core are paid once and each task adds only its R3
numbers per layer; LoRA-STL adds a full LoRA per task; LoRA-HPS stays constant.
"""

from __future__ import annotations

from pathlib import Path

from mtsam.adapters.inject import adapter_count_formula
from mtsam.adapters.spec import AdapterSpec

# SAM encoders: (width, blocks).
VIT_SIZES: dict[str, tuple[int, int]] = {
    "vit_b": (768, 12),
    "vit_l": (1024, 24),
    "vit_h": (1280, 32),
}
METHODS = ("tora", "lora_stl", "lora_hps")


def param_growth(
    *,
    max_tasks: int = 10,
    tora_ranks: tuple[int, int, int] = (32, 32, 4),
    lora_rank: int = 32,
    targets: tuple[str, ...] = ("qkv",),
) -> list[dict[str, int | str]]:
    """Adapter parameter counts for T = 1..max_tasks: rows {model, tasks, tora, lora_stl, lora_hps}.

    ToRA uses Tucker ranks ``tora_ranks`` (R3 held fixed as T grows, as in the paper's
    R3 = 4); the LoRAs use ``lora_rank`` (default R1 = R2, the same bottleneck width).
    """
    if max_tasks < 1:
        raise ValueError(f"max_tasks must be >= 1, got {max_tasks}")
    r1, r2, r3 = tora_ranks
    specs = {
        "tora": AdapterSpec(method="tora", r1=r1, r2=r2, r3=r3, targets=targets),
        "lora_stl": AdapterSpec(method="lora_stl", rank=lora_rank, targets=targets),
        "lora_hps": AdapterSpec(method="lora_hps", rank=lora_rank, targets=targets),
    }
    rows: list[dict[str, int | str]] = []
    for model, (width, depth) in VIT_SIZES.items():
        for t in range(1, max_tasks + 1):
            row: dict[str, int | str] = {"model": model, "tasks": t}
            for name, spec in specs.items():
                row[name] = adapter_count_formula(spec, embed_dim=width, depth=depth, num_tasks=t)
            rows.append(row)
    return rows


def growth_markdown(rows: list[dict[str, int | str]]) -> str:
    """A markdown table of :func:`param_growth` rows (counts in millions, 3 decimals)."""
    lines = [
        "| model | T | ToRA (M) | LoRA-STL (M) | LoRA-HPS (M) | STL / ToRA |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        tora, stl, hps = (int(r[m]) for m in METHODS)
        lines.append(
            f"| {r['model']} | {r['tasks']} | {tora / 1e6:.3f} | {stl / 1e6:.3f} | "
            f"{hps / 1e6:.3f} | {stl / tora:.2f} |"
        )
    return "\n".join(lines)


def plot_param_growth(
    path: str | Path,
    *,
    max_tasks: int = 10,
    tora_ranks: tuple[int, int, int] = (32, 32, 4),
    lora_rank: int = 32,
) -> Path:
    """Write a PNG (one panel per ViT size, parameters vs T per method) to ``path``; returns it.

    Uses matplotlib's Agg canvas directly, so no global backend is changed.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = param_growth(max_tasks=max_tasks, tora_ranks=tora_ranks, lora_rank=lora_rank)
    labels = {
        "tora": f"ToRA (Tucker {tora_ranks[0]}/{tora_ranks[1]}/{tora_ranks[2]})",
        "lora_stl": f"LoRA-STL (r={lora_rank} per task)",
        "lora_hps": f"LoRA-HPS (r={lora_rank} shared)",
    }
    fig = Figure(figsize=(12, 3.8), dpi=100)
    FigureCanvasAgg(fig)
    for i, model in enumerate(VIT_SIZES):
        ax = fig.add_subplot(1, len(VIT_SIZES), i + 1)
        mine = [r for r in rows if r["model"] == model]
        tasks = [int(r["tasks"]) for r in mine]
        for m in METHODS:
            ax.plot(tasks, [int(r[m]) / 1e6 for r in mine], marker="o", ms=3, label=labels[m])
        ax.set_title(f"SAM ViT-{model[-1].upper()} encoder, qkv adapters")
        ax.set_xlabel("number of tasks T")
        ax.set_ylabel("trainable adapter parameters (M)")
        ax.grid(alpha=0.3)
        if i == 0:
            ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out
