import os

# Triton kernels are tested on CPU tensors through Triton's interpreter, which is chosen
# when triton is first imported; setdefault lets a GPU run override it with 0.
os.environ.setdefault("TRITON_INTERPRET", "1")
