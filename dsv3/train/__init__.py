"""The pretraining / extension training loop as a layer the stages compose (docs/design.md,
"Layers": stages → train → model):

    settings.py    LoopSettings, built from the pretrain section or an extension phase
    schedules.py   LR, λ, γ and batch-size schedules as functions of the tokens seen; the step plan
    data.py        packed rows in a deterministic, resumable step order
    module.py      the LightningModule: forward → loss → backward → clip → step → router biases → metrics
    balancing.py   the loss-free bias update
    checkpoints.py atomic checkpoints, the previous one kept, unreadable ones set aside
    sharded.py     the sharded (torch.distributed.checkpoint) format: read safely, or whole by one process
    strategy.py    ShardedStrategy: Lightning's ModelParallelStrategy with those checkpoint rules
    parallel.py    FSDP2 on every block and the root, expert parallelism (all-to-all token dispatch)
    fit.py         fit(): one run of the loop (pretraining or one extension phase)
    launch.py      torchrun for several processes
    compile.py     compiled decoder and MTP blocks
    plan.py        per-device memory of a recipe under DDP / FSDP / FSDP+EP (dsv3 plan)
    plots.py       loss, MaxVio and expert-load plots
"""

from dsv3.train.fit import FitResult, fit
from dsv3.train.settings import LoopSettings

__all__ = ["FitResult", "LoopSettings", "fit"]
