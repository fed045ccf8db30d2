//! Bounds checks shared by every section: each names the field it rejects.

use std::time::Duration;

use super::ConfigError;

pub(super) fn check_positive(field: &str, d: Duration, min: Duration) -> Result<(), ConfigError> {
    if d < min {
        return Err(ConfigError::new(
            field,
            format!("must be at least {}", humantime::format_duration(min)),
        ));
    }
    Ok(())
}

pub(super) fn check_fraction(field: &str, v: f64, lo: f64, hi: f64) -> Result<(), ConfigError> {
    if !(v.is_finite() && v >= lo && v <= hi) {
        return Err(ConfigError::new(
            field,
            format!("must be between {lo} and {hi}, got {v}"),
        ));
    }
    Ok(())
}

pub(super) fn check_range(field: &str, v: usize, lo: usize, hi: usize) -> Result<(), ConfigError> {
    if v < lo || v > hi {
        return Err(ConfigError::new(
            field,
            format!("must be between {lo} and {hi}, got {v}"),
        ));
    }
    Ok(())
}
