"""Layer 3: quantization methods (uniform QAT, FracBits, HAWQ baseline).

``QATModel`` / ``quantize`` (uniform and FracBits), cost models, budgets and
penalties, hard assignment, and the HAWQ-style bit allocation.
"""
