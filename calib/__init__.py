"""INT8 calibration: the calibration feed (``calib.feed``), Q/DQ quantization for TensorRT
(``calib.quantize``, rules in ``calib.qdq``) and the legacy TensorRT entropy calibrator
(``calib.trt_calibrator``). Importing the package loads nothing heavy."""
