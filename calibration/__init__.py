"""Calibration: per-channel observers, threshold rules, the DA-QCFS psi/phi fit, and the saved artifact."""

from .affine import fit_affine, site_error
from .artifact import Calibration, CalibrationConfig, SiteParams
from .calibrate import burst_needed, calibrate, fit_calibration, fit_site, observe_sites
from .distill import finetune_
from .int8 import (BACKENDS as INT8_BACKENDS, BackendUnavailableError, Int8Linear, keep_float_weights, prepare_int8_,
                   quantize_weights_)
from .observer import ChannelObserver
from .thresholds import RULES, choose_thresholds, mse_thresholds

__all__ = [
    "BackendUnavailableError", "Calibration", "CalibrationConfig", "ChannelObserver", "INT8_BACKENDS", "Int8Linear",
    "RULES", "SiteParams", "burst_needed", "calibrate", "finetune_", "keep_float_weights", "prepare_int8_",
    "quantize_weights_",
    "choose_thresholds", "fit_affine", "fit_calibration", "fit_site", "observe_sites", "mse_thresholds", "site_error",
]
