"""Calibration: per-channel observers, threshold rules, the DA-QCFS psi/phi fit, and the saved artifact."""

from .affine import fit_affine, site_error
from .artifact import Calibration, CalibrationConfig, SiteParams
from .calibrate import calibrate, fit_calibration, fit_site, observe_sites
from .observer import ChannelObserver
from .thresholds import RULES, choose_thresholds, mse_thresholds

__all__ = [
    "Calibration", "CalibrationConfig", "ChannelObserver", "RULES", "SiteParams", "calibrate",
    "choose_thresholds", "fit_affine", "fit_calibration", "fit_site", "observe_sites", "mse_thresholds", "site_error",
]
