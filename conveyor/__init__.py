"""Shared models and configuration for Conveyor (imported by every layer, imports none of them)."""
