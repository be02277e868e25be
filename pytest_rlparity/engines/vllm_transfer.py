"""Weight updates through vLLM's weight-transfer API: the trainer side of NCCL broadcast and CUDA IPC.

Production RL pushes weights from the trainer's GPU memory into the engine's workers, not
through a directory: ``init_weight_transfer_engine`` once, then per update
``start_weight_update`` / ``update_weights`` / ``finish_weight_update`` (vLLM >= 0.24, GPU only).
The engine is started with ``weight_transfer_config={"backend": "nccl"}`` (or ``"ipc"``); this
module is the trainer that sends.

- ``nccl``: the trainer is rank 0 of a process group with every worker (ranks 1..tp) and
  broadcasts each tensor. NCCL refuses two ranks on one GPU, so the trainer needs a GPU of its
  own: ``tp + 1`` GPUs.
- ``ipc``: the trainer shares its tensors' CUDA memory; every worker opens the handle for its own
  GPU, so the trainer holds a copy on each worker's GPU. Handles cannot be opened by the process
  that made them: the workers must run in processes of their own (``engine_core="process"`` or
  tensor parallelism).
"""

from __future__ import annotations

import base64
import importlib.util
import os
import pickle
import socket
import threading
from collections.abc import Callable, Sequence
from typing import Any

from ..errors import EngineError

BACKENDS = ("nccl", "ipc")
INSECURE_SERIALIZATION = "VLLM_ALLOW_INSECURE_SERIALIZATION"
"""vLLM's switch for pickled messages, read by the engine core and by this process alike: set only while an
engine started, the engine's first call hung (H100, vLLM 0.26.0), so it is the run's setting, never one engine's."""


def unavailable(backend: str, tensor_parallel_size: int = 1) -> str | None:
    """Why ``backend`` cannot run here (``None`` when it can): a skip reason for the checks."""
    if backend not in BACKENDS:
        return f"unknown weight-transfer backend {backend!r}; pytest-rlparity sends with {', '.join(BACKENDS)}"
    if importlib.util.find_spec("vllm.distributed.weight_transfer") is None:
        return "the installed vLLM has no weight-transfer API (vllm.distributed.weight_transfer, vLLM >= 0.24)"
    import torch

    if not torch.cuda.is_available():
        return f"the {backend} weight transfer needs CUDA GPUs"
    gpus = torch.cuda.device_count()
    if backend == "nccl" and gpus < tensor_parallel_size + 1:
        return (
            f"the nccl weight transfer needs {tensor_parallel_size + 1} GPUs ({tensor_parallel_size} for the engine, one for "
            f"the trainer: NCCL refuses two ranks on one GPU); {gpus} visible"
        )
    if backend == "ipc":
        try:  # the workers import it to receive; vLLM 0.26's imports ray at module level
            importlib.import_module("vllm.distributed.weight_transfer.ipc_engine")
        except ImportError as error:
            return f"the installed vLLM's ipc backend cannot be imported here: {error}"
        if os.environ.get(INSECURE_SERIALIZATION) != "1":
            return (
                f"the ipc backend sends pickled CUDA handles, which vLLM takes only with {INSECURE_SERIALIZATION}=1 in the "
                "environment of the whole run (the engine core and this process both read it): set it to run this check"
            )
    return None


class WeightSender:
    """The trainer end of one engine's weight transfer, set up once and used for every update."""

    def __init__(self, llm: Any, backend: str, tensor_parallel_size: int) -> None:
        reason = unavailable(backend, tensor_parallel_size)
        if reason is not None:
            raise EngineError(reason)
        self.llm = llm
        self.backend = backend
        self.tp = tensor_parallel_size
        self.group: Any = None
        if backend == "nccl":
            self._init_nccl()

    def _init_nccl(self) -> None:
        """Rendezvous: the workers join from inside the engine while the trainer joins here, at once."""
        import torch
        from vllm.distributed.weight_transfer.nccl_engine import NCCLWeightTransferEngine

        port = _free_port()
        info = {"master_address": "127.0.0.1", "master_port": port, "world_size": self.tp + 1}
        with torch.cuda.device(self.tp):  # the trainer's GPU, without moving the session's current device
            self.group = _alongside(
                lambda: self.llm.init_weight_transfer_engine({"init_info": {**info, "rank_offset": 1}}),
                lambda: NCCLWeightTransferEngine.trainer_init(info),
            )

    def send(self, tensors: Sequence[tuple[str, Any]]) -> None:
        """One update: every ``(name, tensor)`` (checkpoint names, trainer tensors) into every worker."""
        self.llm.start_weight_update()
        try:
            if self.backend == "nccl":
                self._send_nccl(tensors)
            else:
                self._send_ipc(tensors)
        finally:
            self.llm.finish_weight_update()

    def _send_nccl(self, tensors: Sequence[tuple[str, Any]]) -> None:
        import torch
        from vllm.distributed.weight_transfer.nccl_engine import NCCLWeightTransferEngine

        device = f"cuda:{self.tp}"
        on_trainer = [(name, tensor.to(device)) for name, tensor in tensors]
        meta = {**_layout(on_trainer), "packed": True}
        with torch.cuda.device(self.tp):
            _alongside(
                lambda: self.llm.update_weights({"update_info": meta}),
                lambda: NCCLWeightTransferEngine.trainer_send_weights(iter(on_trainer), {"group": self.group, "packed": True}),
            )

    def _send_ipc(self, tensors: Sequence[tuple[str, Any]]) -> None:
        import torch
        from torch.multiprocessing.reductions import reduce_tensor

        keep = []  # the shared memory must outlive the workers' reads
        handles = []
        for _, tensor in tensors:
            per_gpu = {}
            for gpu in range(self.tp):
                copy = tensor.detach().to(f"cuda:{gpu}").contiguous()
                keep.append(copy)
                per_gpu[str(torch.cuda.get_device_properties(gpu).uuid)] = reduce_tensor(copy)[1]
            handles.append(per_gpu)
        torch.cuda.synchronize()
        self.llm.update_weights({"update_info": {
            **_layout(tensors),
            # Handles hold types that vLLM's message encoding refuses on the way to the engine core.
            "ipc_handles_pickled": base64.b64encode(pickle.dumps(handles)).decode("ascii"),
        }})
        del keep
        torch.cuda.ipc_collect()


def _layout(tensors: Sequence[tuple[str, Any]]) -> dict[str, list[Any]]:
    """What every backend's update info says of the tensors: names, dtypes and shapes, in order."""
    return {
        "names": [name for name, _ in tensors],
        "dtype_names": [str(t.dtype).removeprefix("torch.") for _, t in tensors],
        "shapes": [list(t.shape) for _, t in tensors],
    }


def _alongside(engine_side: Callable[[], Any], trainer_side: Callable[[], Any]) -> Any:
    """Run the engine's call in a thread and the trainer's here (both block until the other joins);
    the trainer's result, after re-raising the engine's error if it had one."""
    failure: list[BaseException] = []

    def run() -> None:
        try:
            engine_side()
        except BaseException as error:  # noqa: BLE001 - re-raised in the caller's thread
            failure.append(error)

    thread = threading.Thread(target=run, name="rlparity-weight-transfer", daemon=True)
    thread.start()
    result = trainer_side()
    thread.join()
    if failure:
        raise failure[0]
    return result


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
