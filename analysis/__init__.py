"""Studies and runs as tables and figures: `study_frame`, `summary_frame`, `write_report`.

Reads what search/ and hybrids.training write (Optuna studies, run directories, MLflow runs); nothing imports it back.
"""

from analysis.frames import DEFAULT_STORAGE, ReportError, StudyMeta, load_study, study_frame, summary_frame
from analysis.report import ReportResult, write_report

__all__ = ["DEFAULT_STORAGE", "ReportError", "ReportResult", "StudyMeta", "load_study", "study_frame",
           "summary_frame", "write_report"]
