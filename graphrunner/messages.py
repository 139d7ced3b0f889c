"""The fixes hazard messages suggest, shared by the capture guard, validation and the audit."""

WRITE_FIX = ("an op writes past a buffer it allocated, typically per-batch metadata (page table, KV indices, "
             "top-k rows) sized for fewer rows than its kernel writes: size it for the padded batch, or allocate "
             "it once with gr.workspace()")
STATE_FIX = ("a kernel reads state it expects to persist between replays (a counter reset on exit, a table "
             "computed once) from memory allocated inside the capture, which other sizes reuse: keep such state "
             "in gr.workspace(name, nbytes, zero=..., init=...), made before capture")
BORROW_FIX = ("declare memory that outlives the runner (GraphRunner(keep=[tensor or module, ...]), or make fn an "
              "nn.Module that owns it as a parameter or buffer, or allocate it with gr.workspace()), so that "
              "nothing else in the process frees it while the graph uses it")
