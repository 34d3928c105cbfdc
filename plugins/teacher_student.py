"""Built-in plugin teacher_student: being written (see the open issues); no hooks yet."""
