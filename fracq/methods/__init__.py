"""Layer 3: quantization methods, one package per method.

``uniform`` (fixed bits on a registered range estimator's grid),
``fracbits`` (learned fractional bits: quantizer, penalties, hard
assignment), ``hawq`` (Hessian traces and ILP bit allocation), ``preserve``
(sparsity- and cluster-preserving kernel transforms), ``f8net``. Each
method's quantizer implements ``quantize`` and ``freeze``
(:mod:`fracq.methods.common`), dispatched through
:mod:`fracq.methods.quantizers`. Shared: ``QATModel`` / ``quantize``
(``qat``), the cost model and budgets (``cost``) and the provider the
interceptor calls (``providers``).
"""
