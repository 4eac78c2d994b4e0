"""Drift monitoring without labels: input and output statistics of served images compared
with the training-set reference saved with each model (:mod:`breastscan.monitoring.drift`),
recorded per request by the service (:mod:`breastscan.monitoring.recorder`) and reported by
``breastscan monitor`` (:mod:`breastscan.monitoring.report`)."""
