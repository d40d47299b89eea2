"""LLMCompiler: plan a DAG of tool calls in one LLM call, run independent calls in parallel."""
