"""The workflow around the `slowfast` library: config, CLI (`python -m pipelines`), and the steps
that run on Ray Data, Ray Train and MLflow. The network's math lives in `slowfast/`, not here.
"""
