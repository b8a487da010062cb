"""dreamdeck's engine: models, weights, the stream, the runtime and the command line.

Dependencies run one way: models <- stream <- runtime <- cli. The engine never imports
`bridges`; only the command line wires bridges to the runtime.
"""

__version__ = "0.1.0"
