"""Knowledge distillation: teacher-student, feature hints, simulated (data-free) distillation, parameter fusion."""
