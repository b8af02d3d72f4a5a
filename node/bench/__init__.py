"""Benchmarking: how fast and how accurate each model is, on this machine.

- ``node.bench.command``: ``python -m node bench`` (models x batch sizes, end-to-end runs);
- ``node.bench.measure``: timing a backend, accuracy on labelled crops, a pipeline run;
- ``node.bench.peer``: a single-stage YOLO detector timed on the same frames, for comparison;
- ``node.bench.env`` and ``node.bench.report``: the machine's description and the report;
- ``node.bench.selfcheck``: ``python -m node selfcheck`` on a Jetson (TensorRT vs ONNX Runtime).
- ``node.bench.soak``: ``python -m node.bench.soak``, a long run with every publisher on, for
  resident memory growth.
"""
