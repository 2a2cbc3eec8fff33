"""asv benchmarks of the fused DeepSeek MoE layer. GPU only: without CUDA every benchmark is skipped.

All numbers come from `_measure.measurements` (CUDA-event medians from
`deepseek_moe_fused.timing.median_ms`: warmed up, the L2 emptied by a read before each run,
baselines in the same process), so every track of one (preset, N) shares one set of inputs built
by the same factory the tests use.
"""

from ._measure import PRESET_SIZES, measurements, require_gpu


class _Tracks:
    """Base: parameters and the skip-without-GPU setup; subclasses pick the presets."""

    param_names = ("preset", "tokens")
    timeout = 900  # building a V3 layer and the first compile take a while

    def setup(self, preset, tokens):
        require_gpu()
        if tokens not in PRESET_SIZES[preset]:
            raise NotImplementedError(f"{preset} is not measured at N={tokens}")  # asv: skipped
        self.m = measurements(preset, tokens)


def _track(key: str, unit: str, doc: str):
    def track(self, preset, tokens):
        if key not in self.m:  # not measured for this preset (see _measure.py)
            return float("nan")
        return self.m[key]

    track.unit = unit
    track.__doc__ = doc
    return track


def _all_sizes(presets):
    return sorted({n for p in presets for n in PRESET_SIZES[p]})


class ExpertsForward(_Tracks):
    """Experts only, given the routing: the fused kernels and the baselines they are judged by.
    Times are CUDA-graph replays (device time); LayerForwardBackward has the eager times."""

    params = (list(PRESET_SIZES), _all_sizes(PRESET_SIZES))
    track_fused_ms = _track("fused_ms", "ms", "Fused kernels: gate/up+SwiGLU (routed+shared), down, combine.")
    track_unfused_ms = _track("unfused_ms", "ms", "Same kernels, shared MLP launched apart (the ablation).")
    track_grouped_mm_ms = _track("grouped_mm_ms", "ms", "torch._grouped_mm pipeline baseline.")
    track_naive_ms = _track("naive_ms", "ms", "The seed's per-expert PyTorch loop (eager: it syncs per expert).")
    track_pct_of_floor = _track("pct_of_floor", "%", "Roofline floor / fused time (higher is better).")
    track_tflops = _track("tflops", "TFLOP/s", "Useful FLOPs / fused time (higher is better).")
    track_peak_device_mb = _track("fused_peak_mb", "MB", "Device memory the fused forward allocates.")
    track_first_call_compile_s = _track("compile_s", "s", "First call with an empty Triton cache.")


class Router(_Tracks):
    """The layer's router alone (logits + top-k): the Triton kernels and transformers' op
    sequence, CUDA-graph replays."""

    params = (list(PRESET_SIZES), _all_sizes(PRESET_SIZES))
    track_router_ms = _track("router_ms", "ms", "Triton router (the layer's default).")
    track_router_torch_ms = _track("router_torch_ms", "ms", "PyTorch router (DEEPSEEK_MOE_ROUTER=torch).")


class LayerForwardBackward(_Tracks):
    """The whole layer (router + metadata + experts), forward and forward+backward, eager: host
    launch overhead included, as a caller sees it."""

    params = (list(PRESET_SIZES), _all_sizes(PRESET_SIZES))
    track_layer_forward_ms = _track("layer_ms", "ms", "DeepSeekMoELayer forward.")
    track_layer_fwd_bwd_ms = _track("fwd_bwd_ms", "ms", "DeepSeekMoELayer forward + PyTorch backward.")
    track_layer_fwd_bwd_triton_ms = _track("fwd_bwd_triton_ms", "ms", "DeepSeekMoELayer forward + Triton backward.")
    track_grouped_mm_fwd_bwd_ms = _track("grouped_mm_fwd_bwd_ms", "ms", "grouped_mm pipeline forward + backward.")
    track_fwd_bwd_peak_device_mb = _track("fwd_bwd_peak_mb", "MB", "Device memory of forward + PyTorch backward.")
    track_fwd_bwd_triton_peak_device_mb = _track(
        "fwd_bwd_triton_peak_mb", "MB", "Device memory of forward + Triton backward."
    )
    track_grouped_mm_fwd_bwd_peak_device_mb = _track(
        "grouped_mm_fwd_bwd_peak_mb", "MB", "Device memory of the grouped_mm pipeline's forward + backward."
    )


class TrainingStepGraphed(_Tracks):
    """Forward + backward replayed from CUDA graphs: device time of a training step, without the
    Python launch overhead that moves eager small-batch times run to run."""

    params = (list(PRESET_SIZES), _all_sizes(PRESET_SIZES))
    track_fwd_bwd_triton_graph_ms = _track("fwd_bwd_triton_graph_ms", "ms", "Layer forward + Triton backward.")
    track_grouped_mm_fwd_bwd_graph_ms = _track(
        "grouped_mm_fwd_bwd_graph_ms", "ms", "grouped_mm pipeline forward + backward under autograd."
    )
    track_bwd_triton_graph_ms = _track("bwd_triton_graph_ms", "ms", "Triton backward alone (step - forward).")
    track_bwd_triton_pct_of_floor = _track(
        "bwd_triton_pct_of_floor", "%", "Backward floor (2x the forward's) / Triton backward (higher is better)."
    )
