//! The Kubernetes API server as a source (to come).
