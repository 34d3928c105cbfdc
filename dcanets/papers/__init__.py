"""One module per paper procedure, named ``p<paper>_<procedure>`` (see docs/papers.md).

p001_teacher_student  teacher-student population loss and the skip-layer prior (paper 001)
p002_relaxation       ReLU regression vs its convex relaxation (paper 002)
p002_deep_linear      deep linear nets with and without shortcuts, SVD oracle (paper 002)
p002_multibranch      non-convexity of multi-branch nets versus the number of branches (paper 002)
p003_convex           convex residual networks and their measures (paper 003)
p003_linear_double    single versus double products of linear layers (paper 003, Fig. 3)
"""
