"""graphrunner: run each LLM serving step through CUDA graphs sharing one PyTorch pool.

Capture every batch size largest first into one pool, replay any batch with one native call, and find
shared-pool memory bugs at start-up.
"""
from graphrunner._native import CudaError, GraphStateError
from graphrunner.distributed import DistributedCaptureError
from graphrunner.graph import Graph
from graphrunner.hazards import CaptureGuardWarning, GraphHazardError, ValidationReport
from graphrunner.report import CaptureReport, SizeReport
from graphrunner.runner import GraphRunner, StaticInput
from graphrunner.schedule import default_capture_sizes
from graphrunner.workspace import WorkspaceError, workspace

__version__ = "0.1.0"

__all__ = [
    "CaptureGuardWarning", "CaptureReport", "CudaError", "DistributedCaptureError", "Graph", "GraphHazardError",
    "GraphRunner", "GraphStateError", "SizeReport", "StaticInput", "ValidationReport", "WorkspaceError",
    "default_capture_sizes", "workspace",
]
