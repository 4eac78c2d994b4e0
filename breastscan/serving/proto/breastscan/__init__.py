"""Protocol buffer package ``breastscan`` (generated code lives in its version subpackages)."""
