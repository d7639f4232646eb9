"""The network walls: every byte that crosses between a sandbox and the world goes through here.

See README.md beside this file for what each wall promises and which test proves it.
"""
