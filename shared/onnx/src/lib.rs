//! skein-onnx: ONNX models for Skein (interface; implementation in progress).
