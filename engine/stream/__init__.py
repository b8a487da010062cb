"""The stream: step schedules, the KV cache, prompt blending and the block loop.

Plain and synchronous: no threads, sockets or clocks live here.
"""
