"""The flows' maths: configs, bijective layers, st-networks, RealNVP and Glow, the likelihood convention and the
precision the st-networks train in. Imports nothing else of flowcore: every other room builds on this one."""
