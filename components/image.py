"""The container image every stage runs in: the project's image, tagged with its version."""

DEFAULT_IMAGE = "ghcr.io/kd-pipeline/kdp:0.1.0"
