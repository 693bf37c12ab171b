"""Stubs generated from proto/generate.proto at build time (make stubs). Never edited by hand."""
