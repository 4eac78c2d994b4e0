"""Images before a model sees them: decoding (PNG, JPEG, PGM, DICOM), files, preprocessing."""
