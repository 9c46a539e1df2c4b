//! YAML files as a source (to come).
