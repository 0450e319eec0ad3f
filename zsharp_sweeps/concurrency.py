"""One process-wide lock for the CUDA work that concurrent trials must not overlap.

Why: the ``zsharp_streams`` launcher runs several trials as threads of one process, each on
its own CUDA stream. Replaying CUDA graphs and launching kernels side by side is fine, but a
graph capture is invalidated when another thread meanwhile does something that touches the
whole device: creating cuBLAS/cuDNN handles or workspaces, cuDNN autotuning, loading kernels
for the first time (all of which a trial's first steps and first evaluation do). Seen on an
H100: "operation failed due to a previous error during capture"; and a replay while another
thread captures trips over the shared CUDA generator ("Cannot prepare for replay during
capturing stage"). So model setup, a run's first steps, warm-up, capture, each replay's
launch (a host call of microseconds) and evaluation hold this lock; the loader's and metric
kernels of later steps do not, and the GPU runs the trials' graphs concurrently. Uncontended
(one trial per process, the usual case) it costs nothing measurable.
"""

from __future__ import annotations

import threading

#: Re-entrant: a locked section may call another (setup builds a model that evaluates, ...).
CUDA_EXCLUSIVE = threading.RLock()
