"""Comparison reports: a JSON record, a Markdown summary and a self-contained HTML page.

Public API::

    from slimformer.report import write_report, pareto_front
"""

from slimformer.report.pareto import pareto_front
from slimformer.report.writers import write_report

__all__ = ["pareto_front", "write_report"]
