"""graphrunner: run each LLM serving step through CUDA graphs sharing one PyTorch pool.

Capture every batch size largest first into one pool, replay any batch with one native call, keep alive
every byte the graphs use, and find shared-pool memory bugs at start-up (`GraphRunner.validate`).

Besides the runner: `Graph` (one graph into any pool), `capture_stream` (the private stream graphrunner captures
on, for code that captures graphs of its own next to a runner's), `audit_graphs` (the audit of any Graphs captured
with keep_graph=True), and the module `graphrunner.testing` (comparing graph outputs with eager).
"""
__version__ = "0.2.0"

from graphrunner.audit import AuditReport, Reference, audit_graphs
from graphrunner.dispatch import Dispatch
from graphrunner.errors import (CaptureGuardWarning, CudaError, DistributedCaptureError, GraphHazardError,
                                GraphStateError, WorkspaceError)
from graphrunner.graph import Graph, capture_stream
from graphrunner.inputs import StaticInput
from graphrunner.piecewise import Break, BreakOp, breaking_op
from graphrunner.plan import CapturePlan
from graphrunner.record import CaptureRecord, CaptureReport, PoolReport, SizeEntry, SizeReport
from graphrunner.runner import GraphRunner, RunnerState, capture_all, dry_run, validate_all
from graphrunner.schedule import default_capture_sizes
from graphrunner.spec import RunnerSpec, StepInfo
from graphrunner.validate import ValidationReport
from graphrunner.workspace import workspace

__all__ = [
    "AuditReport", "Break", "BreakOp", "CaptureGuardWarning", "CapturePlan", "CaptureRecord", "CaptureReport",
    "CudaError", "DistributedCaptureError", "Dispatch", "Graph", "GraphHazardError", "GraphRunner", "GraphStateError",
    "PoolReport", "Reference", "RunnerSpec", "RunnerState", "SizeEntry", "SizeReport", "StaticInput", "StepInfo",
    "ValidationReport", "WorkspaceError", "audit_graphs", "breaking_op", "capture_all", "capture_stream",
    "default_capture_sizes", "dry_run", "validate_all", "workspace",
]
