"""The report of a run: CSV tables (`tables`), PNG figures (`figures`) and report.html (`page`)."""

from .page import write_report
from .tables import fmt

__all__ = ["fmt", "write_report"]
