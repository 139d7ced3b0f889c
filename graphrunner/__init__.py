"""graphrunner: run each LLM serving step through CUDA graphs sharing one PyTorch pool.

Capture every batch size largest first into one pool, replay any batch with one native call, keep alive
every byte the graphs use, and find shared-pool memory bugs at start-up (`GraphRunner.validate`).
"""
__version__ = "0.2.0"

from graphrunner._native import CudaError, GraphStateError
from graphrunner.audit import AuditReport, Reference
from graphrunner.capture_guard import CaptureGuardWarning, GraphHazardError
from graphrunner.distributed import DistributedCaptureError
from graphrunner.graph import Graph
from graphrunner.inputs import StaticInput
from graphrunner.record import CaptureRecord, CaptureReport, SizeEntry, SizeReport
from graphrunner.runner import GraphRunner, RunnerState, capture_all, validate_all
from graphrunner.schedule import default_capture_sizes
from graphrunner.spec import RunnerSpec, StepInfo
from graphrunner.validate import ValidationReport
from graphrunner.workspace import WorkspaceError, workspace

__all__ = [
    "AuditReport", "CaptureGuardWarning", "CaptureRecord", "CaptureReport", "CudaError", "DistributedCaptureError",
    "Graph", "GraphHazardError", "GraphRunner", "GraphStateError", "Reference", "RunnerSpec", "RunnerState",
    "SizeEntry", "SizeReport", "StaticInput", "StepInfo", "ValidationReport", "WorkspaceError", "capture_all",
    "default_capture_sizes", "validate_all", "workspace",
]
