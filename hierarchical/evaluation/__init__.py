"""Predictions to numbers, text and figures: metrics, temperature scaling, selective threshold, calibration, report
data, markdown and figures."""
