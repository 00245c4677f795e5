"""Autoscaling of a KVBufferService fleet from its replicas' decode-path telemetry.

`config` (the CR's knobs), `telemetry` (what the replicas report), `policy` (the pure decision). The operator's
timer feeds the policy and applies its decision; nothing here talks to Kubernetes.
"""
