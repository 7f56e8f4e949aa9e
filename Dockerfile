# The agentrt image: CLI, replay client and (later) policy workers.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY streams streams
COPY framework_emitter framework_emitter
COPY policy_workers policy_workers
COPY engine_emitter engine_emitter
COPY agentrt agentrt
COPY benchmarks benchmarks
RUN pip install --no-cache-dir '.[postgres,worker]'
ENTRYPOINT ["agentrt"]
