"""The engine: one process that holds the models and forms every batch, fed by the worker
processes (the fronts) that speak HTTP and gRPC.

With `engine = true` and `workers = N`, the supervisor starts one engine process and N
fronts. A front receives, decodes and checks each request, then hands its instances to the
engine over a local ZeroMQ socket, one message per event-loop turn for all the requests that
turn produced; the engine submits them to the model's one batcher, so every front's requests
meet in the same batches, and the weights are loaded once. Answers come back the same way.

- `wire`: how requests, answers and errors cross (pickle's protocol 5, arrays as frames of
  their own, not copied into the message).
- `process`: the engine process: its models, its socket, its drain.
- `link`: a front's end of the socket: requests out, answers and the engine's model states
  in, every request failed at once when the engine goes away.
- `remote`: a front's `ModelService`: the same contract, its batches run by the engine.
"""
