"""parity.plan: torch-free cost model for DeepSeek serving across vendors (docs/plan.md).

- `params`: parameter counts, layer schedule, cache bytes of a `ModelConfig` (`parity info`)
- `hardware`: catalog (`get_hardware`, `catalog`) and per-family calibration constants (`family_of`)
- `arch`: V4 (`V4Arch`) and V3/R1 MLA (`MLAArch`) as the cost model sees them (`load_arch`)
- `serving_model`: serving model (`Deployment`, `op_costs`, `step_terms`, `decode_point`, `prefill_point`)
- `estimate`: one fixed deployment's figures (`Setup`, `estimate`), the entries' and CLI's evaluator
- `search`: `plan(model, hardware, Workload)` and `frontier`
- `validate`: published measurements, `report()` (errors, MAPE, leave-one-out), `fit`
- `report`: `compare(...)` with the HTML Pareto report
"""
