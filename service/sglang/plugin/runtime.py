"""What the plugin attaches to each SGLang GDN attention backend (one per tensor-parallel rank): its settings,
its pools, the plan of the forward in flight and which layer is running."""

from __future__ import annotations

from dataclasses import dataclass, field

from .counters import DeviceTally
from .plan import StepPlan
from .pools import KVBufferPools
from .settings import PluginSettings

ATTRIBUTE = "_kvbuffer"  # the attribute name on GDNAttnBackend and its GDNKernelDispatcher


@dataclass
class Runtime:
    settings: PluginSettings
    pools: KVBufferPools
    layer_index: dict[int, int]  # SGLang layer id -> index into pools.buffers (SGLang's mamba_map)
    tally: DeviceTally | None  # None on the ranks that do not report the decode-path counters (one per group)
    plan: StepPlan | None = None  # this forward's plan (plan.py), set by the metadata hooks
    graph_plan: StepPlan | None = None  # CUDA-graph static buffers the captured plans live in
    layer: int = -1  # index into pools.buffers of the GDN layer now running
    draft_tokens: int = field(default=0)

    def current_plan(self) -> StepPlan:
        if self.plan is None:
            raise RuntimeError("kvbuffer: a GDN kernel ran before the forward's metadata was planned")
        return self.plan
