"""Preprocess: intensity profiles (named by the model card) and the model grid."""

from service.preprocess.grid import (
    ModelGrid,
    ModelInput,
    model_grid_for,
    resample_to_model_grid,
    to_model_input,
    to_native_grid,
)
from service.preprocess.profiles import (
    DEFAULT_PROFILE,
    HARMONISING_PROFILES,
    PROFILES,
    ProfileOptions,
    VendorWindow,
    VendorWindows,
    Window,
    b1000_equivalent,
    b1000_equivalent_kurtosis,
    brain_mask,
    histogram_peak_normalise,
    n4_correct,
)

__all__ = [
    "DEFAULT_PROFILE",
    "HARMONISING_PROFILES",
    "PROFILES",
    "ModelGrid",
    "ModelInput",
    "ProfileOptions",
    "VendorWindow",
    "VendorWindows",
    "Window",
    "b1000_equivalent",
    "b1000_equivalent_kurtosis",
    "brain_mask",
    "histogram_peak_normalise",
    "model_grid_for",
    "n4_correct",
    "resample_to_model_grid",
    "to_model_input",
    "to_native_grid",
]
