"""Layer 3: quantization methods, one package per method.

``uniform`` (fixed bits on a registered range estimator's grid; its
``TensorSpec`` is the base of every method's rule spec), ``fracbits``
(learned fractional bits: ``FracBitsSpec``, quantizer, penalties, hard
assignment), ``hawq`` (Hessian traces and ILP bit allocation),
``preserve`` (sparsity- and cluster-preserving kernel transforms),
``f8net``. Each method's quantizer implements ``quantize`` and ``freeze``
(:mod:`fracq.methods.common`), dispatched through
:mod:`fracq.methods.quantizers`; its ``factory`` module builds its model
wrapper from the fields of its config block (plain keyword arguments plus
the shared :class:`~fracq.methods.context.Context`), and its ``lowering``
module, where it has one, registers its integer lowering with
:mod:`fracq.export`. Shared: ``QATModel`` / ``quantize`` (``qat``), the
cost model and budgets (``cost``), the factories' context and rule list
(``context``) and the provider the interceptor calls (``providers``).
"""
