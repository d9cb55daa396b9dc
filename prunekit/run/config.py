"""The frozen description of one run; everything the pipeline needs and the report records."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from prunekit.engine.quantize import QuantizeConfig
from prunekit.engine.schedule import ScheduleConfig
from prunekit.load.preprocess import Preprocess
from prunekit.validate.onnx_runtime import ValidateOptions


@dataclass(frozen=True)
class PruneConfig:
    model: str
    pruner: str
    sparsity: float
    mask: str = "global"
    structure: str | None = None  # "channels": whole channels per dependency group
    min_channels: int = 1  # --structure: the fewest channels a group keeps
    channel_multiple: int = 1  # --structure: kept channels rounded up to a multiple of this
    exclude: tuple[str, ...] = ()
    # per-layer sparsity: the first glob a target's name matches gives its own sparsity;
    # -s is then that of the other targets
    layer_sparsity: dict[str, float] = field(default_factory=dict)
    data: str | None = None
    normalize: str | None = None  # preset or MEAN/STD (prunekit.load.preprocess)
    image_size: int | None = None  # image folders: resize + centre-crop to this size
    max_length: int | None = None  # text: data, tokens per text (default 128, model limit)
    weights: Path | None = None
    num_classes: int | None = None
    trust_checkpoint: bool = False
    params: dict[str, str | int | float | bool] = field(default_factory=dict)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    recalibrate_bn: bool | None = None  # None: on where whole channels are removed
    memory_budget: int | None = None  # bytes; None: a safe fraction of free memory
    objective: str | None = (
        None  # prunekit.contract.objectives; None: the default for model and data
    )
    verbose: bool = False
    device: str = "auto"
    seed: int = 0
    exports: tuple[str, ...] = ("safetensors",)
    quantize: str | None = None  # int8 or int4: weights on an integer grid, a quantized ONNX
    rounding: str = "gptq"  # --quantize int4: rtn or gptq
    group_size: int = 32  # --quantize int4: inputs per scale
    quantize_fallback: bool = False  # keep the FP32 export when ONNX Runtime cannot quantize
    validate: bool = False
    max_accuracy_drop: float | None = None  # --validate gates: nothing is written when one
    min_cosine: float | None = None  # fails
    validate_runs: int = 100  # --validate: timed ONNX Runtime runs per model and batch size
    validate_threads: int | None = None  # --validate: intra-op threads (None: ORT's default)
    out: Path = Path("prunekit-out")
    force: bool = False
    command: tuple[str, ...] = ()  # the command line that asked for the run, if any

    @staticmethod
    def model_stem(model: str) -> str:
        """The model's name in an output folder's name: hf:/abs/dir -> dir, a.b -> a_b."""
        return (Path(model.split(":")[-1]).name or "model").replace(".", "_")

    @staticmethod
    def default_out(
        model: str,
        pruner: str,
        sparsity: float,
        mask: str = "global",
        structure: str | None = None,
        quantize: str | None = None,
    ) -> Path:
        """prunekit-out/MODEL-PRUNER-S[-MASK][-STRUCTURE][-QUANTIZE], where OUT is not given:
        runs that differ in any of these do not collide."""
        parts = [PruneConfig.model_stem(model), pruner, f"{sparsity:g}"]
        parts += [mask.replace(":", "of")] if mask != "global" else []
        parts += [p for p in (structure, quantize) if p]
        return Path("prunekit-out") / "-".join(parts)

    def quantization(self) -> QuantizeConfig | None:
        if self.quantize is None:
            return None
        return QuantizeConfig(self.quantize, self.rounding, self.group_size)

    def validate_options(self) -> ValidateOptions:
        return ValidateOptions(
            max_accuracy_drop=self.max_accuracy_drop,
            min_cosine=self.min_cosine,
            runs=self.validate_runs,
            threads=self.validate_threads or 0,
        )

    def preprocess(self) -> Preprocess:
        """--normalize and --image-size; for torchvision's published weights, by default the
        normalisation and image side they were evaluated with."""
        normalize, size = self.normalize, self.image_size
        kind, _, rest = self.model.partition(":")
        if kind == "torchvision" and ":" in rest and (normalize is None or size is None):
            from prunekit.load.hub import published_preprocessing

            mean, std, crop = published_preprocessing(*rest.split(":", 1))
            if normalize is None and mean and std:
                normalize = f"{','.join(map(str, mean))}/{','.join(map(str, std))}"
            size = crop if size is None else size
        return Preprocess(normalize, size)

    def to_json(self) -> dict[str, Any]:
        """JSON-ready view (paths as strings)."""
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}
